"""Which processes are alive and what they hold: each worker (and each API process, for
service.retired_models) refreshes a JSON presence key with a short TTL."""

from __future__ import annotations

import json
from typing import Any

from redis import Redis

from contract.keys import RedisKeys


def presence_records(redis: Redis, pattern: str) -> list[tuple[str, dict[str, Any]]]:
    """(key, JSON record) of every presence key matching `pattern` that has not expired."""
    found = []
    for key in redis.scan_iter(match=pattern, count=100):
        raw = redis.get(key)
        if raw is not None:  # expired between the scan and the read
            found.append((key.decode() if isinstance(key, bytes) else str(key), json.loads(raw)))
    return found


def live_worker_info(redis: Redis, keys: RedisKeys) -> list[dict[str, Any]]:
    """The presence record of every live worker (name, pid, models, gpu_memory_bytes, at)."""
    return [info for _, info in presence_records(redis, keys.worker_pattern())]


def live_worker_models(redis: Redis, keys: RedisKeys) -> dict[str, list[str]]:
    """{worker name: [model names]} for every worker whose presence key has not expired."""
    return {
        str(info.get("name", key)): list(info.get("models", []))
        for key, info in presence_records(redis, keys.worker_pattern())
    }
