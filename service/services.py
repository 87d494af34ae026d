"""The long-lived objects one API process holds, built once from settings in create_app."""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio import ConnectionPool as AsyncConnectionPool
from redis.asyncio import Redis as AsyncRedis
from rq import Queue

from contract.jobs import Priority
from contract.keys import RedisKeys
from contract.queueing import generation_queue, generation_queues, queues_ahead
from contract.redis_connection import connect
from contract.settings import ModelSpec, Settings, load_model_specs
from contract.state import JobStore
from contract.storage import ResultStorage, build_storage

# The longest a blocking read waits for events before its caller looks again (is the client
# still there, is this process shutting down, is a keepalive due).
BLOCKING_READ_S = 1.0
# Short asyncio commands (a status read is one HGETALL) in flight at once; a burst beyond waits
# for a connection up to the timeout instead of failing at once, as redis-py's default pool does.
ASYNC_POOL_SIZE = 100
ASYNC_POOL_WAIT_S = 5.0


@dataclass
class ApiServices:
    settings: Settings
    redis: Redis
    async_redis: AsyncRedis  # short commands
    # Reads that block until events come (event streams, `Prefer: wait`): a pool of their own,
    # sized by the limits on both, so that no number of them can take a status read's connection.
    blocking_redis: AsyncRedis
    keys: RedisKeys
    store: JobStore
    queues: list[Queue]  # every configured model's queues, for depth and metrics
    storage: ResultStorage
    models: list[ModelSpec]
    # Set when the server starts shutting down (service.serving.DrainingServer): event streams
    # and waits end at their next look, instead of holding the process until their jobs end.
    draining: bool = False
    open_event_streams: int = 0  # taken and given back by routes.generations (EventStream)

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
            # from_pool: the client owns its pool, and aclose() closes the pool's connections.
            async_redis=AsyncRedis.from_pool(
                BlockingConnectionPool.from_url(
                    settings.redis_url,
                    max_connections=ASYNC_POOL_SIZE,
                    timeout=ASYNC_POOL_WAIT_S,
                    socket_connect_timeout=2.0,
                    socket_timeout=3.0,
                )
            ),
            # Blocking reads wait BLOCKING_READ_S at most: the read timeout sits above it, so a
            # Redis that stops answering still ends in a 503 or an error event, never a hang.
            blocking_redis=AsyncRedis.from_pool(
                AsyncConnectionPool.from_url(
                    settings.redis_url,
                    # Each stream and each wait holds one while it reads: both are capped (the
                    # stream slots, the wait limiter), so this pool, a few spare, never runs out
                    # first.
                    max_connections=settings.max_event_streams + settings.max_waiting_requests + 16,
                    socket_connect_timeout=2.0,
                    socket_timeout=BLOCKING_READ_S + 5.0,
                )
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
