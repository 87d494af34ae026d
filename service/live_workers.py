"""Which workers are alive and what they hold: each worker refreshes a key with a short TTL."""

from __future__ import annotations

import json
from typing import Any

from redis import Redis

from contract.keys import RedisKeys


def live_worker_info(redis: Redis, keys: RedisKeys) -> list[dict[str, Any]]:
    """The presence record of every live worker (name, pid, models, gpu_memory_bytes, at)."""
    found = []
    for key in redis.scan_iter(match=keys.worker_pattern(), count=100):
        raw = redis.get(key)
        if raw is not None:
            found.append(json.loads(raw))
    return found


def live_worker_models(redis: Redis, keys: RedisKeys) -> dict[str, list[str]]:
    """{worker name: [model names]} for every worker whose presence key has not expired."""
    found: dict[str, list[str]] = {}
    for key in redis.scan_iter(match=keys.worker_pattern(), count=100):
        raw = redis.get(key)
        if raw is None:
            continue
        info = json.loads(raw)
        found[str(info.get("name", key))] = list(info.get("models", []))
    return found
