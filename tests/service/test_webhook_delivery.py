"""One webhook attempt against real loopback sockets and a real Redis: a receiver that drips its
answer is cut off at the deadline, an endless body is not read to its end, signatures are the
Standard Webhooks ones, and deliveries given up on are kept as dead letters.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from redis import Redis

from contract.jobs import GenerationParams, JobOrigin, JobRecord, JobStatus
from contract.keys import RedisKeys
from contract.settings import Settings, settings_from_env
from contract.webhook_queue import (
    WebhookDelivery,
    claim_due,
    read_dead,
    schedule,
    signing_key,
)
from service.webhook_delivery import MAX_BACKOFF_S, WebhookSender, retry_delay, sign
from service.webhook_worker import WebhookDispatcher

pytestmark = pytest.mark.integration

BODY = '{"id": "gen_1", "status": "succeeded"}'
DRIP_S = 60  # how long the dripping receiver would keep one answer going


def settings(redis_url: str, prefix: str, **overrides: object) -> Settings:
    values: dict[str, object] = dict(
        redis_url=redis_url,
        redis_prefix=prefix,
        webhook_secret="whsec_" + base64.b64encode(os.urandom(32)).decode(),
        webhook_allowed_networks="127.0.0.0/8",
        webhook_allow_http=True,
        webhook_backoff_s=0.01,
    )
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def delivery(url: str) -> WebhookDelivery:
    record = JobRecord(
        id="gen_1",
        status=JobStatus.SUCCEEDED,
        params=GenerationParams(prompt="a buoy", model="tiny", width=64, height=64, seed=1),
        created_at=time.time(),
        origin=JobOrigin(request_id="req-1"),
    )
    return WebhookDelivery(
        id="msg_1", job_id="gen_1", event="completed", url=url, record=record, body=BODY
    )


@dataclass
class RawServer:
    """One connection on a loopback socket, answered by hand; `ended` is set when it is over."""

    url: str
    ended: threading.Event = field(default_factory=threading.Event)
    cut_off: bool = False  # the client closed the connection while the answer was still going


@contextmanager
def raw_server(answer: Callable[[socket.socket], None]) -> Iterator[RawServer]:
    listener = socket.create_server(("127.0.0.1", 0))
    server = RawServer(f"http://127.0.0.1:{listener.getsockname()[1]}/hook")

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)  # the request; its content does not matter here
            try:
                answer(conn)
            except OSError:  # broken pipe or reset: the sender hung up
                server.cut_off = True
        server.ended.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        listener.close()


def drip_headers(conn: socket.socket) -> None:
    """A valid response head, one byte a second, for DRIP_S seconds: no read ever stalls."""
    head = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * DRIP_S
    for byte in head[:DRIP_S]:
        conn.sendall(bytes([byte]))
        time.sleep(1)


def endless_body(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n")
    deadline = time.monotonic() + DRIP_S
    while time.monotonic() < deadline:
        conn.sendall(b"x" * 65536)


def test_a_receiver_that_drips_its_answer_is_cut_off_at_the_deadline(
    redis_client: Redis, redis_url: str, key_prefix: str
) -> None:
    config = settings(redis_url, key_prefix, webhook_timeout_s=2)
    with raw_server(drip_headers) as server, closing(WebhookSender(config, redis_client)) as sender:
        started = time.monotonic()
        assert sender.deliver(delivery(server.url)) == "retried"
        # Every read got a byte within the per-read timeout; only the overall deadline ends it.
        assert time.monotonic() - started < DRIP_S / 2
        assert server.ended.wait(DRIP_S / 2) and server.cut_off
    [retry] = claim_due(redis_client, RedisKeys(key_prefix), time.time() + 1, 10, 30)
    assert retry.delivery.attempt == 1 and retry.delivery.id == "msg_1"


def test_an_endless_response_body_is_not_read_to_its_end(
    redis_client: Redis, redis_url: str, key_prefix: str
) -> None:
    config = settings(redis_url, key_prefix, webhook_timeout_s=20)
    with raw_server(endless_body) as server, closing(WebhookSender(config, redis_client)) as sender:
        # Reading a terabyte would end in the deadline's timeout; the capped read delivers.
        assert sender.deliver(delivery(server.url)) == "delivered"
        assert server.ended.wait(DRIP_S / 2) and server.cut_off


@dataclass
class Hook:
    headers: dict[str, str]
    body: bytes


@dataclass
class Concurrency:
    now: int = 0
    most: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def change(self, by: int) -> None:
        with self.lock:
            self.now += by
            self.most = max(self.most, self.now)


@contextmanager
def receiver(
    status: int, hold: threading.Event | None = None, seen: Concurrency | None = None
) -> Iterator[tuple[str, list[Hook]]]:
    """A loopback HTTP receiver that records each request and answers `status` (once `hold`
    is set, when given), counting the requests it holds at once in `seen`."""
    hooks: list[Hook] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            hooks.append(Hook({k.lower(): v for k, v in self.headers.items()}, body))
            if seen:
                seen.change(+1)
            if hold:
                hold.wait(60)
            if seen:
                seen.change(-1)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", hooks
    finally:
        server.shutdown()
        server.server_close()


def standard_webhooks_signature(secret: str, hook: Hook) -> str:
    """The signature as the Standard Webhooks specification defines it, written out here."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    content = f"{hook.headers['webhook-id']}.{hook.headers['webhook-timestamp']}.".encode()
    mac = hmac.new(key, content + hook.body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def test_a_whsec_secret_signs_as_the_standard_webhooks_specification_says(
    redis_client: Redis, redis_url: str, key_prefix: str
) -> None:
    config = settings(redis_url, key_prefix)
    assert config.webhook_secret is not None
    with receiver(200) as (url, hooks), closing(WebhookSender(config, redis_client)) as sender:
        assert sender.deliver(delivery(url)) == "delivered"
    [hook] = hooks
    assert hook.body == BODY.encode()
    assert hook.headers["webhook-id"] == "msg_1"
    assert abs(int(hook.headers["webhook-timestamp"]) - time.time()) < 60
    expected = standard_webhooks_signature(config.webhook_secret.get_secret_value(), hook)
    assert hook.headers["webhook-signature"] == expected


def test_signing_reproduces_the_specifications_published_example() -> None:
    # From the Standard Webhooks specification (and Svix's manual-verification docs).
    key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", '{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_any_other_secret_is_its_own_utf8_key() -> None:
    # As the README says: the same as the Standard Webhooks secret whsec_ + base64(secret).
    raw = "s3cret-ü"
    assert signing_key(raw) == raw.encode()
    assert signing_key("whsec_" + base64.b64encode(raw.encode()).decode()) == raw.encode()


@pytest.mark.parametrize("secret", ["whsec_not base64!", "whsec_abc", "whsec_"])
def test_a_whsec_secret_that_does_not_decode_stops_start_up_in_one_line(
    monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    monkeypatch.setenv("SELFCASCADE_WEBHOOK_SECRET", secret)
    with pytest.raises(SystemExit) as stopped:
        settings_from_env()
    [line] = str(stopped.value).splitlines()
    assert line.startswith("invalid settings: SELFCASCADE_WEBHOOK_SECRET: "), line
    assert "base64" in line
    key_text = secret.removeprefix("whsec_")
    assert not key_text or key_text not in line  # the secret is not echoed


def test_default_retries_back_off_to_the_cap_and_last_for_hours() -> None:
    defaults = Settings()
    delays = [
        retry_delay(failures, defaults.webhook_backoff_s)
        for failures in range(1, defaults.webhook_max_attempts)
    ]
    assert delays[:3] == [1.0, 2.0, 4.0]
    assert delays[-1] == MAX_BACKOFF_S
    assert 2 * 3600 <= sum(delays) <= 4 * 3600


def test_a_delivery_out_of_attempts_is_kept_as_a_dead_letter_with_its_last_error(
    redis_client: Redis, redis_url: str, key_prefix: str
) -> None:
    keys = RedisKeys(key_prefix)
    config = settings(redis_url, key_prefix, webhook_max_attempts=2)
    with receiver(503) as (url, hooks), closing(WebhookSender(config, redis_client)) as sender:
        assert sender.deliver(delivery(url)) == "retried"
        [retry] = claim_due(redis_client, keys, time.time() + 1, 10, 30)
        assert sender.deliver(retry.delivery) == "failed"
    assert [h.headers["webhook-id"] for h in hooks] == ["msg_1", "msg_1"]
    [dead] = read_dead(redis_client, keys)
    assert (dead.id, dead.job_id, dead.event, dead.url) == ("msg_1", "gen_1", "completed", url)
    assert (dead.outcome, dead.attempts) == ("failed", 2)
    assert dead.error == "HTTP 503; no attempts left"


def test_a_refused_answer_is_a_dead_letter_at_once(
    redis_client: Redis, redis_url: str, key_prefix: str
) -> None:
    keys = RedisKeys(key_prefix)
    with receiver(410) as (url, _), closing(
        WebhookSender(settings(redis_url, key_prefix), redis_client)
    ) as sender:
        assert sender.deliver(delivery(url)) == "failed"
    [dead] = read_dead(redis_client, keys)
    assert (dead.attempts, dead.error) == (1, "HTTP 410 (not retried)")
    assert claim_due(redis_client, keys, time.time() + 3600, 10, 30) == []


def test_a_stalled_receiver_holds_only_its_share_of_the_sender_threads(
    redis_client: Redis, redis_url: str, key_prefix: str
) -> None:
    # Four threads, two per receiver: while one receiver hangs on every request (up to the 30 s
    # deadline), another still gets its deliveries at once.
    keys = RedisKeys(key_prefix)
    config = settings(
        redis_url, key_prefix, webhook_timeout_s=30.0, webhook_receiver_concurrency=2
    )
    hold, slow_seen = threading.Event(), Concurrency()
    dispatcher = WebhookDispatcher(config, threads=4)
    with (
        receiver(204, hold, slow_seen) as (slow_url, slow_hooks),
        receiver(204) as (fast_url, fast_hooks),
    ):
        now = time.time()
        for n in range(6):  # the stalled receiver's backlog is due first
            entry = delivery(slow_url).model_copy(update={"id": f"s{n}"})
            schedule(redis_client, keys, entry, now - 10 + n)
        for n in range(3):
            entry = delivery(fast_url).model_copy(update={"id": f"f{n}"})
            schedule(redis_client, keys, entry, now - 1)
        dispatcher.start_thread()
        try:
            wait_until(lambda: len(fast_hooks) == 3, 10, "the other receiver's deliveries")
            assert slow_seen.most == 2 and len(slow_hooks) == 2
            hold.set()
            wait_until(lambda: len(slow_hooks) == 6, 30, "the stalled receiver's backlog")
        finally:
            hold.set()
            dispatcher.stop.set()
    assert slow_seen.most == 2


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def answer_503_retry_after_superscript(conn: socket.socket) -> None:
    # Latin-1 0xB2 ("2" superscript): a digit to str.isdigit(), not to float().
    conn.sendall(b"HTTP/1.1 503 Busy\r\nRetry-After: \xb2\r\nContent-Length: 0\r\n\r\n")


def test_a_retry_after_that_is_not_seconds_is_ignored_not_a_crash(
    redis_client: Redis, redis_url: str, key_prefix: str
) -> None:
    config = settings(redis_url, key_prefix)
    with raw_server(answer_503_retry_after_superscript) as server, closing(
        WebhookSender(config, redis_client)
    ) as sender:
        assert sender.deliver(delivery(server.url)) == "retried"
    [retry] = claim_due(redis_client, RedisKeys(key_prefix), time.time() + 5, 10, 30)
    assert retry.delivery.attempt == 1


def test_a_name_that_does_not_resolve_at_delivery_is_retried_not_given_up(
    redis_client: Redis, redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolve = socket.getaddrinfo

    def resolver_down_for_hooks(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.example.com":  # no DNS server here to take down: its answer, faked
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver_down_for_hooks)
    keys = RedisKeys(key_prefix)
    with closing(WebhookSender(settings(redis_url, key_prefix), redis_client)) as sender:
        assert sender.deliver(delivery("https://hooks.example.com/hook")) == "retried"
    assert read_dead(redis_client, keys) == []
    [retry] = claim_due(redis_client, keys, time.time() + 5, 10, 30)
    assert retry.delivery.attempt == 1


def test_each_delivery_opens_its_own_connection(
    redis_client: Redis, redis_url: str, key_prefix: str
) -> None:
    """Requests go to the checked IP: a kept connection would carry the next delivery to any
    other name on that IP without its own TLS handshake (no certificate check for that name)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        while len(accepted) < 2:
            conn, _ = listener.accept()
            accepted.append(conn)
            while conn.recv(65536).count(b"\r\n\r\n") == 0:
                pass
            conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    config = settings(redis_url, key_prefix)
    with closing(listener), closing(WebhookSender(config, redis_client)) as sender:
        assert sender.deliver(delivery(url)) == "delivered"
        assert sender.deliver(delivery(url)) == "delivered"
        wait_until(lambda: len(accepted) == 2, 5, "a second connection")
    for conn in accepted:
        conn.close()


def test_an_ipv6_literal_receiver_gets_a_bracketed_host_header(
    redis_client: Redis, redis_url: str, key_prefix: str
) -> None:
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = listener.getsockname()[1]
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            seen.append(conn.recv(65536))
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    config = settings(redis_url, key_prefix, webhook_allowed_networks="::1/128")
    with closing(listener), closing(WebhookSender(config, redis_client)) as sender:
        assert sender.deliver(delivery(f"http://[::1]:{port}/hook")) == "delivered"
    assert f"Host: [::1]:{port}\r\n".encode() in seen[0]


def test_a_delivery_that_crashes_the_sender_counts_as_an_attempt(
    redis_client: Redis, redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug met by one delivery must not bring it back on every claim for ever."""

    def broken(self: WebhookSender, *args: object) -> None:
        raise RuntimeError("a bug in the sender")

    monkeypatch.setattr(WebhookSender, "deliver", broken)
    keys = RedisKeys(key_prefix)
    config = settings(redis_url, key_prefix, webhook_max_attempts=1)
    schedule(redis_client, keys, delivery("http://127.0.0.1:9/hook"), time.time() - 1)
    dispatcher = WebhookDispatcher(config, threads=1)
    dispatcher.start_thread()
    try:
        wait_until(lambda: bool(read_dead(redis_client, keys)), 10, "the dead letter")
    finally:
        dispatcher.stop.set()
    [dead] = read_dead(redis_client, keys)
    assert (dead.attempts, dead.error) == (1, "sender error: RuntimeError; no attempts left")
    assert claim_due(redis_client, keys, time.time() + 3600, 10, 30) == []
