"""API keys, ownership, backpressure, idempotency races, webhook URL checks and request ids,
against a real uvicorn and a real Redis. No worker runs here: jobs stay queued on purpose."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from redis import Redis

from contract.jobs import JobEvent, JobStatus
from contract.keys import RedisKeys
from contract.queueing import generation_queue, generation_queues
from contract.state import JobStore
from service.app import create_app
from service.idempotency import fingerprint
from service.schemas import GenerationCreate
from service.webhook_targets import WebhookPolicy, WebhookTarget
from tests.conftest import free_port
from tests.live_stack import ApiServer, wait_for, write_models_file
from tests.service.conftest import SettingsFactory

pytestmark = pytest.mark.integration

BODY = {"prompt": "a harbour", "width": 64, "height": 64, "steps": 2}
ALICE = {"Authorization": "Bearer alice-secret-token-0123456789"}
BOB = {"Authorization": "Bearer bob-secret-token-9876543210"}
KEYS = "alice:alice-secret-token-0123456789,bob:bob-secret-token-9876543210"


@contextmanager
def api(settings_for: SettingsFactory, **overrides: object) -> Iterator[httpx.Client]:
    app = create_app(settings_for(**overrides))
    with ApiServer(app, free_port()) as server, server.client() as client:
        yield client


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error: dict = response.json()["error"]
    assert error["code"] == code and error["message"]
    return error


def test_keys_mode_needs_a_valid_key_and_hides_other_keys_jobs(
    settings_for: SettingsFactory,
) -> None:
    with api(settings_for, auth_mode="keys", api_keys=KEYS) as client:
        missing = client.post("/v1/generations", json=BODY)
        assert_error(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = client.post("/v1/generations", json=BODY, headers={"Authorization": "Bearer x"})
        assert_error(wrong, 401, "unauthorized")
        assert_error(client.get("/v1/models"), 401, "unauthorized")
        assert client.get("/healthz").status_code == 200  # probes never need a key

        created = client.post("/v1/generations", json=BODY, headers=ALICE)
        assert created.status_code == 202, created.text
        job = created.json()["id"]
        assert client.get(f"/v1/generations/{job}", headers=ALICE).status_code == 200
        for method, path in (
            ("GET", f"/v1/generations/{job}"),
            ("GET", f"/v1/generations/{job}/events"),
            ("POST", f"/v1/generations/{job}/cancel"),
            ("GET", f"/v1/generations/{job}/outputs/0"),
        ):
            foreign = client.request(method, path, headers=BOB)
            assert_error(foreign, 404, "not_found")
        # Bob's attempt to cancel did nothing.
        assert client.get(f"/v1/generations/{job}", headers=ALICE).json()["status"] == "queued"


def test_rate_limit_answers_429_with_retry_after(settings_for: SettingsFactory) -> None:
    with api(settings_for, rate_limit_per_minute=6, rate_limit_burst=2) as client:
        assert client.post("/v1/generations", json=BODY).status_code == 202
        assert client.post("/v1/generations", json=BODY).status_code == 202
        limited = client.post("/v1/generations", json=BODY)
        assert_error(limited, 429, "rate_limited")
        # 6/minute refills one token every 10 s.
        assert 1 <= int(limited.headers["retry-after"]) <= 10


def test_rate_limit_is_per_key(settings_for: SettingsFactory) -> None:
    overrides = dict(auth_mode="keys", api_keys=KEYS, rate_limit_per_minute=1, rate_limit_burst=1)
    with api(settings_for, **overrides) as client:
        assert client.post("/v1/generations", json=BODY, headers=ALICE).status_code == 202
        assert_error(client.post("/v1/generations", json=BODY, headers=ALICE), 429, "rate_limited")
        assert client.post("/v1/generations", json=BODY, headers=BOB).status_code == 202


def test_full_queue_answers_429_with_retry_after(settings_for: SettingsFactory) -> None:
    with api(settings_for, max_queue_length=2) as client:
        for _ in range(2):
            assert client.post("/v1/generations", json=BODY).status_code == 202
        full = client.post("/v1/generations", json={**BODY, "priority": "batch"})
        assert_error(full, 429, "queue_full")
        assert int(full.headers["retry-after"]) > 0


def test_active_job_cap_frees_a_slot_when_a_job_ends(settings_for: SettingsFactory) -> None:
    with api(settings_for, max_active_jobs_per_key=1) as client:
        first = client.post("/v1/generations", json=BODY)
        assert first.status_code == 202
        capped = client.post("/v1/generations", json=BODY)
        assert_error(capped, 429, "too_many_active_jobs")
        assert "retry-after" in capped.headers
        client.post(f"/v1/generations/{first.json()['id']}/cancel")
        assert client.post("/v1/generations", json=BODY).status_code == 202


def test_twenty_concurrent_duplicates_create_exactly_one_job(
    settings_for: SettingsFactory, redis_client: Redis
) -> None:
    settings = settings_for()
    headers = {"Idempotency-Key": "order-42"}
    with ApiServer(create_app(settings), free_port()) as server:

        def post(_: int) -> httpx.Response:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                return c.post("/v1/generations", json=BODY, headers=headers)

        with ThreadPoolExecutor(20) as pool:
            responses = list(pool.map(post, range(20)))
        assert {r.status_code for r in responses} == {202}, [r.text for r in responses]
        assert len({r.json()["id"] for r in responses}) == 1
        jobs = [
            k for k in redis_client.scan_iter(match=f"{settings.redis_prefix}:job:*")
            if not k.endswith((b":events", b":cancel"))
        ]
        assert len(jobs) == 1
        queued = sum(len(q) for q in generation_queues(redis_client, settings, ["tiny"]))
        assert queued == 1

        with server.client() as client:
            changed = client.post(
                "/v1/generations", json={**BODY, "prompt": "other"}, headers=headers
            )
            assert assert_error(changed, 409, "conflict")["param"] == "Idempotency-Key"
            tagged = client.post(
                "/v1/generations", json={**BODY, "metadata": {"order": "42"}}, headers=headers
            )
            assert assert_error(tagged, 409, "conflict")["param"] == "Idempotency-Key"


def test_a_body_without_metadata_keeps_the_idempotency_fingerprint_it_had_before_metadata() -> None:
    """A retry that spans the upgrade which added `metadata` is still a replay, not a 409: the
    hash below is what releases before that field computed for this body."""
    body = GenerationCreate(prompt="a fox", width=128, height=128, steps=4, seed=3)
    before = "781415687868c66b901cb0c2b1a13b5c9cf3d2738dd74207e14d43afc5e4e01f"
    assert fingerprint(body) == before
    assert fingerprint(body.model_copy(update={"metadata": {}})) == before


def test_metadata_in_another_order_is_the_same_request(settings_for: SettingsFactory) -> None:
    headers = {"Idempotency-Key": "order-99"}
    with api(settings_for) as client:
        first = client.post(
            "/v1/generations", json={**BODY, "metadata": {"a": "1", "b": "2"}}, headers=headers
        )
        again = client.post(
            "/v1/generations", json={**BODY, "metadata": {"b": "2", "a": "1"}}, headers=headers
        )
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
        other = {"Idempotency-Key": "order-98"}
        bare = client.post("/v1/generations", json=BODY, headers=other)
        empty = client.post("/v1/generations", json={**BODY, "metadata": {}}, headers=other)
        assert empty.json()["id"] == bare.json()["id"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "https://127.0.0.1/hook",
        "https://10.0.0.7/hook",
        "https://10.255.1.1:8443/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://localhost/hook",
        "https://[::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
        # IPv6 addresses that carry a private or metadata IPv4 one: NAT64, 6to4, IPv4-compatible
        "https://[64:ff9b::a9fe:a9fe]/latest/meta-data",
        "https://[64:ff9b:1::a00:5]/hook",
        "https://[2002:a00:5::1]/hook",
        "https://[::7f00:1]/hook",
        "https://[::ffff:0:a00:5]/hook",  # SIIT's IPv4-translated form
        "https://[64:ff9b:1::808:808]/hook",  # local-use NAT64: layouts hide the IPv4 anywhere
        "ftp://example.com/hook",
    ],
)
def test_webhooks_to_internal_addresses_are_refused(
    settings_for: SettingsFactory, url: str
) -> None:
    with api(settings_for, webhook_secret="s3cret", webhook_allow_http=True) as client:
        refused = client.post("/v1/generations", json={**BODY, "webhook": url})
        assert assert_error(refused, 422, "invalid_request")["param"] == "webhook"


def test_malformed_webhook_urls_are_422_naming_the_reason_not_500(
    settings_for: SettingsFactory,
) -> None:
    # urlsplit and SplitResult.port raise ValueError on these; each must still be a 422.
    cases = {
        "https://[::1": "malformed URL",
        "https://[not-an-ip]/hook": "malformed URL",
        "https://example.com:99999/hook": "invalid port",
        "https://example.com:eighty/hook": "invalid port",
        "https://example.com:0/hook": "invalid port",
    }
    with api(settings_for, webhook_secret="s3cret") as client:
        for url, reason in cases.items():
            refused = client.post("/v1/generations", json={**BODY, "webhook": url})
            error = assert_error(refused, 422, "invalid_request")
            assert error["param"] == "webhook"
            assert error["message"].startswith(f"webhook: {reason}"), (url, error["message"])


def test_allow_list_admits_a_loopback_webhook_and_http_needs_opt_in(
    settings_for: SettingsFactory,
) -> None:
    overrides = dict(webhook_secret="s3cret", webhook_allowed_networks="127.0.0.0/8")
    with api(settings_for, **overrides) as client:
        http = client.post("/v1/generations", json={**BODY, "webhook": "http://127.0.0.1:9/h"})
        assert_error(http, 422, "invalid_request")  # http not allowed
        ok = client.post("/v1/generations", json={**BODY, "webhook": "https://127.0.0.1:9/h"})
        assert ok.status_code == 202, ok.text
        assert ok.json()["webhook_events_filter"] == ["completed"]
    with api(settings_for, webhook_allowed_networks="127.0.0.0/8") as client:
        unsigned = client.post("/v1/generations", json={**BODY, "webhook": "https://127.0.0.1/h"})
        assert_error(unsigned, 422, "invalid_request")  # no secret: webhooks are off


def test_a_webhook_is_limited_per_machine_not_per_name(
    settings_for: SettingsFactory, redis_client: Redis
) -> None:
    # Two spellings of one loopback address (and two ports): one receiver for the send limit.
    settings = settings_for(webhook_secret="s3cret", webhook_allowed_networks="127.0.0.0/8")
    store = JobStore(redis_client, RedisKeys(settings.redis_prefix), 60)
    with ApiServer(create_app(settings), free_port()) as server, server.client() as client:
        for url in ("https://127.0.0.1:9/h", "https://127.1:10/h"):
            reply = client.post("/v1/generations", json={**BODY, "webhook": url})
            assert reply.status_code == 202, reply.text
            record = store.get(reply.json()["id"])
            assert record is not None and record.origin.webhook_receiver == "ip 127.0.0.1"
            assert "webhook_receiver" not in reply.json()  # internal: not part of the API


@pytest.mark.parametrize(
    ("address", "receiver"),
    [
        ("203.0.113.7", "ip 203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "ip 2001:db8:1:2::/64"),  # one host's usual IPv6 allocation
        ("2001:db8:1:2:bbbb::9", "ip 2001:db8:1:2::/64"),
        ("::ffff:203.0.113.7", "ip 203.0.113.7"),
        # NAT64 (DNS64 on an IPv6-only cluster): one receiver per IPv4 host, not one for all.
        ("64:ff9b::cb00:7107", "ip 203.0.113.7"),
        ("64:ff9b::808:808", "ip 8.8.8.8"),
        ("2002:cb00:7107::1", "ip 203.0.113.7"),  # 6to4
    ],
)
def test_the_receiver_of_a_webhook_target_is_its_machine(address: str, receiver: str) -> None:
    target = WebhookTarget("https://x.test/", "https", "x.test", 443, address)
    assert target.receiver == receiver


def test_an_allow_list_may_name_either_form_of_a_translated_address() -> None:
    nat64_allowed = WebhookPolicy([ipaddress.ip_network("64:ff9b::/96")], allow_http=False)
    assert nat64_allowed.permits(ipaddress.ip_address("64:ff9b::a00:5"))  # 10.0.0.5, via NAT64
    ipv4_allowed = WebhookPolicy([ipaddress.ip_network("10.0.0.0/8")], allow_http=False)
    assert ipv4_allowed.permits(ipaddress.ip_address("64:ff9b::a00:5"))
    assert not WebhookPolicy([], allow_http=False).permits(ipaddress.ip_address("64:ff9b::a00:5"))


def test_request_id_and_traceparent_are_echoed_and_stored(
    settings_for: SettingsFactory, redis_client: Redis
) -> None:
    settings = settings_for()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with ApiServer(create_app(settings), free_port()) as server, server.client() as client:
        generated = client.get("/healthz").headers["x-request-id"]
        assert len(generated) == 32
        response = client.post(
            "/v1/generations",
            json=BODY,
            headers={"X-Request-ID": "req-abc.123", "traceparent": traceparent},
        )
        assert response.headers["x-request-id"] == "req-abc.123"
        error = client.post("/v1/generations", json={}, headers={"X-Request-ID": "bad one!"})
        assert error.status_code == 422 and len(error.headers["x-request-id"]) == 32
    raw = redis_client.hget(f"{settings.redis_prefix}:job:{response.json()['id']}", "origin")
    assert raw is not None
    origin = json.loads(raw)
    assert origin["request_id"] == "req-abc.123"
    assert origin["traceparent"] == traceparent


def test_batch_jobs_queue_behind_interactive_ones(settings_for: SettingsFactory) -> None:
    with api(settings_for) as client:
        batch = client.post("/v1/generations", json={**BODY, "priority": "batch"}).json()
        client.post("/v1/generations", json=BODY)
        client.post("/v1/generations", json=BODY)
        view = client.get(f"/v1/generations/{batch['id']}").json()
        assert view["priority"] == "batch"
        assert view["queue_position"] == 2  # two interactive jobs run first


def test_each_model_has_its_own_queue(
    settings_for: SettingsFactory, redis_client: Redis, tmp_path: Path, tiny_model_dir: Path
) -> None:
    models = write_models_file(tmp_path / "two-models.json", tiny_model_dir, ("tiny", "tiny-b"))
    settings = settings_for(models_file=models, max_queue_length=2)
    with api(settings_for, models_file=models, max_queue_length=2) as client:
        for _ in range(2):
            client.post("/v1/generations", json=BODY)  # the default model, tiny
        # tiny's queue is full (no worker runs here); tiny-b's is not.
        full = assert_error(client.post("/v1/generations", json=BODY), 429, "queue_full")
        assert "model tiny " in full["message"]
        other = client.post("/v1/generations", json={**BODY, "model": "tiny-b"}).json()
        later = client.post(
            "/v1/generations", json={**BODY, "model": "tiny-b", "priority": "batch"}
        ).json()
        # Only jobs for the same model are ahead: another model's workers take the others.
        assert client.get(f"/v1/generations/{other['id']}").json()["queue_position"] == 0
        assert client.get(f"/v1/generations/{later['id']}").json()["queue_position"] == 1
        queues = {
            (model, priority): len(generation_queue(redis_client, settings, model, priority))
            for model in ("tiny", "tiny-b") for priority in ("interactive", "batch")
        }
        assert queues == {
            ("tiny", "interactive"): 2, ("tiny", "batch"): 0,
            ("tiny-b", "interactive"): 1, ("tiny-b", "batch"): 1,
        }
        metrics = client.get("/metrics").text
        assert 'selfcascade_num_requests_waiting{model="tiny-b",priority="batch"} 1.0' in metrics
        assert "selfcascade_queue_depth 4.0" in metrics

        assert client.post(f"/v1/generations/{other['id']}/cancel").json()["status"] == "canceled"
        assert len(generation_queue(redis_client, settings, "tiny-b")) == 0
        assert client.get(f"/v1/generations/{later['id']}").json()["queue_position"] == 0


def test_a_key_that_may_only_generate_gets_its_waited_job_and_no_links_it_cannot_open(
    settings_for: SettingsFactory, tmp_path: Path, redis_client: Redis
) -> None:
    keys_file = tmp_path / "keys.json"
    token = "erin-token-3333333333333333"
    keys_file.write_text(json.dumps([{"id": "erin", "token": token, "scopes": ["generate"]}]))
    settings = settings_for(auth_mode="keys", api_keys_file=keys_file)
    erin = {"Authorization": f"Bearer {token}"}
    store = JobStore(redis_client, RedisKeys(settings.redis_prefix), 60)

    def finish_the_job_as_a_worker_would() -> None:
        [job_id] = wait_for(lambda: generation_queue(redis_client, settings, "tiny").get_job_ids(),
                            10, "the job to be queued")
        store.transition(job_id, [JobStatus.QUEUED], JobStatus.RUNNING, None)
        store.transition(job_id, [JobStatus.RUNNING], JobStatus.SUCCEEDED,
                         JobEvent(type="succeeded", status=JobStatus.SUCCEEDED, at=time.time()))

    with ApiServer(create_app(settings), free_port()) as server, server.client() as client:
        worker = threading.Thread(target=finish_the_job_as_a_worker_would)
        worker.start()
        waited = client.post("/v1/generations", json=BODY, headers={**erin, "Prefer": "wait=10"})
        worker.join()
        assert waited.status_code == 200, waited.text  # its own job, though it may not `read`
        assert waited.json()["status"] == "succeeded"
        # OpenAI's default answer is download links this key could not open: refused up front.
        links = client.post("/v1/images/generations", json={"prompt": "x"}, headers=erin)
        assert links.status_code == 403 and "b64_json" in links.json()["error"]["message"]
    assert len(job_ids(redis_client, settings.redis_prefix)) == 1


def job_ids(redis: Redis, prefix: str) -> list[bytes]:
    return [k for k in redis.scan_iter(match=f"{prefix}:job:*") if k.count(b":") == 2]


def test_an_openai_request_for_more_images_than_fit_is_refused_whole(
    settings_for: SettingsFactory, redis_client: Redis
) -> None:
    body = {"prompt": "x", "size": "64x64", "n": 3}
    settings = settings_for(max_queue_length=4)
    with ApiServer(create_app(settings), free_port()) as server, server.client() as client:
        for _ in range(2):
            assert client.post("/v1/generations", json=BODY).status_code == 202
        # Two wait of four: three more would overfill the queue.
        full = client.post("/v1/images/generations", json=body)
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
    assert len(job_ids(redis_client, settings.redis_prefix)) == 2


def test_more_images_than_a_key_may_ever_have_active_is_a_400_not_a_429(
    settings_for: SettingsFactory, redis_client: Redis
) -> None:
    settings = settings_for(
        max_active_jobs_per_key=2, max_queue_length=4, rate_limit_per_minute=1, rate_limit_burst=4
    )
    with ApiServer(create_app(settings), free_port()) as server, server.client() as client:
        for n in (3, 5):  # more than the key may have active; more than the queue holds
            answer = client.post("/v1/images/generations", json={"prompt": "x", "n": n})
            # No wait makes room for it, so no Retry-After to loop on.
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["param"] == "n"
        # And they cost no rate-limit tokens (one a minute, a burst of 4): two more jobs pass.
        for _ in range(2):
            assert client.post("/v1/generations", json=BODY).status_code == 202
    assert len(job_ids(redis_client, settings.redis_prefix)) == 2


def test_keys_file_holds_digests_and_scopes(settings_for: SettingsFactory, tmp_path: Path) -> None:
    token = "carol-token-5555555555555555"
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(
        json.dumps(
            [
                {"id": "carol", "sha256": hashlib.sha256(token.encode()).hexdigest()},
                {"id": "dave", "token": "dave-token-77777777777777", "scopes": ["read"]},
            ]
        )
    )
    with api(settings_for, auth_mode="keys", api_keys_file=keys_file) as client:
        carol = {"Authorization": f"Bearer {token}"}
        created = client.post("/v1/generations", json=BODY, headers=carol)
        assert created.status_code == 202, created.text
        digest_as_token = {"Authorization": f"Bearer {hashlib.sha256(token.encode()).hexdigest()}"}
        assert_error(client.post("/v1/generations", json=BODY, headers=digest_as_token), 401,
                     "unauthorized")
        dave = {"Authorization": "Bearer dave-token-77777777777777"}
        assert_error(client.post("/v1/generations", json=BODY, headers=dave), 403, "forbidden")
        assert client.get("/v1/models", headers=dave).status_code == 200
        # Same key, other job: still 404, never 403 (the scope does not reveal the job exists).
        job = created.json()["id"]
        assert_error(client.get(f"/v1/generations/{job}", headers=dave), 404, "not_found")
