"""The long-lived objects one API process holds, built once from settings in create_app."""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq import Queue

from contract.jobs import Priority
from contract.keys import RedisKeys
from contract.queueing import generation_queue, generation_queues, queues_ahead
from contract.redis_connection import connect
from contract.settings import ModelSpec, Settings, load_model_specs
from contract.state import JobStore
from contract.storage import ResultStorage, build_storage


@dataclass
class ApiServices:
    settings: Settings
    redis: Redis
    async_redis: AsyncRedis
    keys: RedisKeys
    store: JobStore
    queues: list[Queue]  # every configured model's queues, for depth and metrics
    storage: ResultStorage
    models: list[ModelSpec]

    @classmethod
    def build(cls, settings: Settings) -> ApiServices:
        if not settings.redis_url:
            raise ValueError("SELFCASCADE_REDIS_URL (or REDIS_URL) must be set for the API")
        # Short timeouts: a dead Redis must become a quick 503, not a hung request.
        client = connect(settings.redis_url, socket_timeout=3.0)
        keys = RedisKeys(settings.redis_prefix)
        models = load_model_specs(settings)
        return cls(
            settings=settings,
            redis=client,
            # The SSE stream blocks in XREAD up to the keepalive interval: the read timeout sits
            # just above it, so a Redis that stops answering still ends in a 503, never a hang.
            async_redis=AsyncRedis.from_url(
                settings.redis_url,
                socket_connect_timeout=2.0,
                socket_timeout=settings.sse_keepalive_s + 5.0,
            ),
            keys=keys,
            store=JobStore(client, keys, settings.result_ttl_s),
            queues=generation_queues(client, settings, [m.name for m in models]),
            storage=build_storage(settings),
            models=models,
        )

    def queue_for(self, model: str, priority: Priority) -> Queue:
        """The queue a job for `model` at `priority` waits in (also for a model no longer in
        the models file: its queued jobs can still be found and canceled)."""
        return generation_queue(self.redis, self.settings, model, priority)

    def queues_ahead_of(self, model: str, priority: Priority) -> list[Queue]:
        return queues_ahead(self.redis, self.settings, model, priority)
