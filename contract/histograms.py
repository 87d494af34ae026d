"""Histograms that several worker processes fill and the API exports.

Workers increment bucket counters in one Redis hash per histogram; /metrics reads them back.
This keeps Prometheus scraping a single endpoint (the API) without a push gateway.
"""

from __future__ import annotations

from redis import Redis
from redis.client import Pipeline

from contract.keys import RedisKeys

QUEUE_WAIT = "queue_wait_seconds"
INFERENCE = "inference_seconds"
E2E_LATENCY = "e2e_request_latency_seconds"
JOBS_FINISHED = "jobs_finished_total"
BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def observe(redis: Redis, keys: RedisKeys, name: str, value: float) -> None:
    with redis.pipeline() as pipe:
        add_observation(pipe, keys, name, value)
        pipe.execute()


def add_observation(pipe: Pipeline, keys: RedisKeys, name: str, value: float) -> None:
    """Queue `value`'s increments on `pipe` (part of a larger transaction, or observe's own)."""
    for field in [f"le_{b:g}" for b in BUCKETS if value <= b] + ["le_+Inf", "count"]:
        pipe.hincrby(keys.histogram(name), field, 1)
    pipe.hincrbyfloat(keys.histogram(name), "sum", value)


def count_finished(redis: Redis, keys: RedisKeys, status: str) -> None:
    redis.hincrby(keys.histogram(JOBS_FINISHED), status, 1)


def read_histogram(
    redis: Redis, keys: RedisKeys, name: str
) -> tuple[list[tuple[str, float]], float]:
    """Cumulative buckets [(le, count)] in Prometheus form, and the sum."""
    raw = _read_hash(redis, keys.histogram(name))
    buckets = [(f"{b:g}", float(raw.get(f"le_{b:g}", 0))) for b in BUCKETS]
    buckets.append(("+Inf", float(raw.get("le_+Inf", 0))))
    return buckets, float(raw.get("sum", 0))


def read_counts(redis: Redis, keys: RedisKeys, name: str) -> dict[str, int]:
    return {k: int(v) for k, v in _read_hash(redis, keys.histogram(name)).items()}


def _read_hash(redis: Redis, key: str) -> dict[str, str]:
    raw: dict[bytes, bytes] = redis.hgetall(key)  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}
