"""The pending-webhook set on a real Redis: due order, one owner per claim, lapsed claims, and
the capped dead-letter list."""

from __future__ import annotations

import time

from redis import Redis

from contract.jobs import GenerationParams, JobOrigin, JobRecord, JobStatus
from contract.keys import RedisKeys
from contract.webhook_queue import (
    CLAIM_SCAN_WINDOW,
    DEAD_LETTERS_KEPT,
    DeadDelivery,
    WebhookDelivery,
    claim_due,
    claim_lifetime_s,
    enqueue_webhook,
    finish_claim,
    read_dead,
    record_dead,
    schedule,
)


def delivery(n: int) -> WebhookDelivery:
    return WebhookDelivery(id=f"msg_{n}", job_id="j", event="completed", url="https://x.test/")


def test_only_due_entries_are_claimed_and_only_once(redis_client: Redis, key_prefix: str) -> None:
    keys = RedisKeys(key_prefix)
    now = time.time()
    schedule(redis_client, keys, delivery(1), now - 1)
    schedule(redis_client, keys, delivery(2), now + 60)
    [first] = claim_due(redis_client, keys, now, 10, claim_s=30)
    assert first.delivery.id == "msg_1"
    assert claim_due(redis_client, keys, now, 10, claim_s=30) == []
    finish_claim(redis_client, keys, first)
    assert claim_due(redis_client, keys, now + 3600, 10, claim_s=30)[0].delivery.id == "msg_2"


def test_a_lapsed_claim_is_due_again(redis_client: Redis, key_prefix: str) -> None:
    keys = RedisKeys(key_prefix)
    now = time.time()
    schedule(redis_client, keys, delivery(3), now)
    assert len(claim_due(redis_client, keys, now, 10, claim_s=5)) == 1
    # The sender died without finishing: after the claim lapses the entry comes back.
    assert claim_due(redis_client, keys, now + 1, 10, claim_s=5) == []
    [again] = claim_due(redis_client, keys, now + 6, 10, claim_s=5)
    assert again.delivery.id == "msg_3"


def to(url: str, n: int, webhook_in_record: str = "https://elsewhere.test/") -> WebhookDelivery:
    """A delivery to `url` whose job record names another webhook URL, as a snapshot can."""
    record = JobRecord(
        id="j", status=JobStatus.SUCCEEDED, created_at=0.0,
        params=GenerationParams(prompt="p", model="tiny", width=64, height=64, seed=1),
        origin=JobOrigin(webhook=webhook_in_record),
    )
    return WebhookDelivery(id=f"msg_{n}", job_id="j", event="completed", url=url, record=record)


def test_one_receiver_gets_at_most_its_share_of_sends(redis_client: Redis, key_prefix: str) -> None:
    keys = RedisKeys(key_prefix)
    now = time.time()
    # A backlog for one slow receiver, due before anything for the others.
    for n in range(5):
        schedule(redis_client, keys, to("https://Slow.test/hook", n), now - 10 + n)
    schedule(redis_client, keys, to("https://slow.test:8443/hook", 5), now - 4)  # another port
    schedule(redis_client, keys, to("https://fast.test/a?x=1", 6), now - 3)
    schedule(redis_client, keys, to("https://fast.test/b", 7), now - 2)

    claimed = claim_due(redis_client, keys, now, 4, claim_s=30, per_receiver=2)
    assert [c.delivery.id for c in claimed] == ["msg_0", "msg_1", "msg_5", "msg_6"]
    # fast.test has a slot left; slow.test's backlog waits behind its two sends in flight.
    [fast] = claim_due(redis_client, keys, now, 4, claim_s=30, per_receiver=2)
    assert fast.delivery.id == "msg_7"
    assert claim_due(redis_client, keys, now, 4, claim_s=30, per_receiver=2) == []
    finish_claim(redis_client, keys, claimed[0])
    # The entries passed over were deferred by a second: the freed slot is taken then.
    assert claim_due(redis_client, keys, now, 4, claim_s=30, per_receiver=2) == []
    [slow] = claim_due(redis_client, keys, now + 2, 4, claim_s=30, per_receiver=2)
    assert slow.delivery.id in {"msg_2", "msg_3", "msg_4"}


def test_many_names_of_one_machine_share_one_receivers_sends(
    redis_client: Redis, key_prefix: str
) -> None:
    # One hostile server behind many subdomains: its deliveries carry the address the API
    # resolved, so they count against one limit; entries from before that field keep host:port.
    keys = RedisKeys(key_prefix)
    now = time.time()
    machine = {"receiver": "ip 203.0.113.7"}
    for n, host in enumerate(["a", "b", "c", "d"]):
        entry = to(f"https://{host}.evil.test/", n).model_copy(update=machine)
        schedule(redis_client, keys, entry, now - 10 + n)
    schedule(redis_client, keys, to("https://fast.test/", 4), now - 1)
    claimed = claim_due(redis_client, keys, now, 4, claim_s=30, per_receiver=2)
    assert [c.delivery.id for c in claimed] == ["msg_0", "msg_1", "msg_4"]


def test_a_jobs_webhook_is_queued_with_its_receiver(redis_client: Redis, key_prefix: str) -> None:
    keys = RedisKeys(key_prefix)
    record = to("https://a.evil.test/", 0).record
    assert record is not None
    origin = JobOrigin(webhook="https://a.evil.test/", webhook_receiver="ip 203.0.113.7")
    assert enqueue_webhook(redis_client, keys, record.model_copy(update={"origin": origin}),
                           "completed")
    [claimed] = claim_due(redis_client, keys, time.time() + 1, 4, claim_s=30)
    assert claimed.delivery.receiver == "ip 203.0.113.7"


def test_a_busy_receivers_backlog_cannot_hide_other_receivers(
    redis_client: Redis, key_prefix: str
) -> None:
    keys = RedisKeys(key_prefix)
    now = time.time()
    backlog = CLAIM_SCAN_WINDOW + 40  # more than one claim looks through
    for n in range(backlog):
        schedule(redis_client, keys, to("https://slow.test/", n), now - 1000 + n)
    schedule(redis_client, keys, to("https://fast.test/", backlog), now - 1)
    first = claim_due(redis_client, keys, now, 4, claim_s=30, per_receiver=2)
    assert [c.delivery.id for c in first] == ["msg_0", "msg_1"]  # the window held only slow.test
    # Those passed over are due a moment later, so the next claim reaches past them.
    [fast] = claim_due(redis_client, keys, now, 4, claim_s=30, per_receiver=2)
    assert fast.delivery.id == f"msg_{backlog}"
    deferred = redis_client.zrangebyscore(keys.webhooks(), now, "+inf")
    ids = {WebhookDelivery.model_validate_json(raw).id for raw in deferred}
    assert ids == {f"msg_{n}" for n in range(2, backlog)}  # nothing lost, nothing claimed twice


def test_a_claim_outlives_the_deadline_of_its_send() -> None:
    for deadline_s in (0.5, 5.0, 30.0, 600.0):
        assert claim_lifetime_s(deadline_s) > deadline_s


def test_dead_letters_are_newest_first_and_capped(redis_client: Redis, key_prefix: str) -> None:
    keys = RedisKeys(key_prefix)
    for n in range(DEAD_LETTERS_KEPT + 5):
        dead = DeadDelivery(
            id=f"msg_{n}", job_id="j", event="completed", url="https://x.test/", attempts=40,
            outcome="failed", error="HTTP 503; no attempts left", at=time.time(),
        )
        record_dead(redis_client, keys, dead)
    kept = read_dead(redis_client, keys)
    assert len(kept) == DEAD_LETTERS_KEPT
    assert kept[0].id == f"msg_{DEAD_LETTERS_KEPT + 4}" and kept[-1].id == "msg_5"
    assert [d.id for d in read_dead(redis_client, keys, 2)] == [kept[0].id, kept[1].id]
