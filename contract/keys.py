"""Redis key names, in one place so API and worker can never disagree."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    prefix: str

    def job(self, job_id: str) -> str:
        """Hash: status and the JSON fields of one generation."""
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        """Stream: every status/progress event of one generation, in order (for SSE)."""
        return f"{self.prefix}:job:{job_id}:events"

    def cancel(self, job_id: str) -> str:
        """String flag: set when a client asked to cancel."""
        return f"{self.prefix}:job:{job_id}:cancel"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}:idem:{key}"

    def worker(self, name: str) -> str:
        """String with TTL: a live worker and the models it holds (JSON)."""
        return f"{self.prefix}:worker:{name}"

    def worker_pattern(self) -> str:
        return f"{self.prefix}:worker:*"

    def api(self, name: str) -> str:
        """String with TTL: a live API process and the models its models file lists (JSON)."""
        return f"{self.prefix}:api:{name}"

    def api_pattern(self) -> str:
        return f"{self.prefix}:api:*"

    def histogram(self, name: str) -> str:
        """Hash of bucket counters written by workers, exported by the API's /metrics."""
        return f"{self.prefix}:metrics:{name}"

    def rate_bucket(self, owner: str) -> str:
        """Hash: one API key's token bucket (tokens, updated_at)."""
        return f"{self.prefix}:ratelimit:{owner}"

    def active_jobs(self, owner: str) -> str:
        """Set: ids of one API key's jobs that may still be live (pruned when checked)."""
        return f"{self.prefix}:active:{owner}"

    def webhooks(self) -> str:
        """Sorted set: pending webhook deliveries (JSON), scored by the unix time they are due."""
        return f"{self.prefix}:webhooks"

    def webhooks_in_flight(self) -> str:
        """Sorted set: claimed deliveries, scored by when their claim lapses (sender died)."""
        return f"{self.prefix}:webhooks:inflight"

    def queued_index(self) -> str:
        """Sorted set: ids of jobs created or requeued, scored by when; the reaper makes sure
        each one still `queued` is in its queue (worker.lost_jobs) and drops the others."""
        return f"{self.prefix}:queued"

    def reaper_lock(self) -> str:
        return f"{self.prefix}:lock:reaper"

    def retired_model_sweep_lock(self) -> str:
        return f"{self.prefix}:lock:retired-models"

    def result_sweep_lock(self) -> str:
        return f"{self.prefix}:lock:result-sweep"
