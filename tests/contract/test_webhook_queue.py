"""The pending-webhook set on a real Redis: due order, one owner per claim, lapsed claims."""

from __future__ import annotations

import time

from redis import Redis

from contract.keys import RedisKeys
from contract.webhook_queue import WebhookDelivery, claim_due, finish_claim, schedule


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
