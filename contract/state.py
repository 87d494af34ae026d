"""Job state in Redis: one hash per job plus an event stream, changed only by atomic transitions.

A status change and its event are written by one Lua script, so a reader never sees a status
without its event (SSE and GET agree), and two writers racing (a cancel and a worker picking
the job up) cannot both win: the transition names the statuses it may start from.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline

from contract.jobs import (
    ErrorInfo,
    GenerationParams,
    JobEvent,
    JobMetrics,
    JobOrigin,
    JobRecord,
    JobStatus,
    OutputRecord,
    ProgressRecord,
)
from contract.keys import RedisKeys

EVENTS_MAXLEN = 2000

# KEYS: job hash, events stream, queued-jobs index. ARGV: allowed statuses (comma list), new
# status, event JSON ('' for none), expiry seconds for both keys ('0' keeps them), the worker
# that must hold the job ('' for any), the attempt number the record must show ('' for any),
# the job id and the time (for the index), then field/value pairs. The index holds exactly the
# jobs in `queued`: every move into or out of it updates the index in the same step.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == cur then allowed = true end
end
if not allowed then return 0 end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[5] then return 0 end
if ARGV[6] ~= '' and (redis.call('HGET', KEYS[1], 'attempts') or '0') ~= ARGV[6] then
  return 0
end
for i = 9, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
if cur == 'queued' and ARGV[2] ~= 'queued' then
  redis.call('ZREM', KEYS[3], ARGV[7])
elseif ARGV[2] == 'queued' and cur ~= 'queued' then
  redis.call('ZADD', KEYS[3], ARGV[8], ARGV[7])
end
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV_MAXLEN, '*', 'event', ARGV[3])
end
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
""".replace("ARGV_MAXLEN", str(EVENTS_MAXLEN))


@dataclass(frozen=True)
class Attempt:
    """One worker's run of a job, as its record names it (`worker`, `attempts`). A worker cut
    off from Redis longer than its lease may find its job run again by another: its writes name
    its attempt and are refused once the record names a later one."""

    worker: str
    number: int


@dataclass(frozen=True)
class RecordHead:
    """The fields of a job's record that every release writes alike, as plain text: enough to
    judge who holds the job even when the rest was written by a newer release in a form this
    one cannot decode (`status` may then be a value this release does not know)."""

    status: str
    worker: str | None
    attempts: int


class JobStore:
    """Typed access to job records; both the API and the worker use it."""

    def __init__(self, redis: Redis, keys: RedisKeys, result_ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.result_ttl_s = result_ttl_s
        self._transition = redis.register_script(_TRANSITION)

    def create(
        self,
        job_id: str,
        params: GenerationParams,
        created_at: float,
        origin: JobOrigin | None = None,
        pipeline: Pipeline | None = None,
    ) -> JobRecord:
        """Write a new queued record; with `pipeline`, only queue the writes on it (the caller
        executes it, e.g. in the same transaction as the RQ enqueue)."""
        origin = origin or JobOrigin()
        record = JobRecord(
            id=job_id, status=JobStatus.QUEUED, params=params, created_at=created_at, origin=origin
        )
        event = JobEvent(type="queued", status=JobStatus.QUEUED, at=created_at)
        if pipeline is not None:
            self._write_new(pipeline, record, event)
        else:
            with self.redis.pipeline() as pipe:
                self._write_new(pipe, record, event)
                pipe.execute()
        return record

    def _write_new(self, pipe: Pipeline, record: JobRecord, event: JobEvent) -> None:
        pipe.hset(
            self.keys.job(record.id),
            mapping={
                "status": record.status.value,
                "params": record.params.model_dump_json(),
                "created_at": repr(record.created_at),
                "attempts": "0",
                "origin": record.origin.model_dump_json(),
            },
        )
        pipe.xadd(self.keys.events(record.id), {"event": event.model_dump_json()})
        pipe.zadd(self.keys.queued_index(), {record.id: record.created_at})

    def get(self, job_id: str) -> JobRecord | None:
        raw: Mapping[bytes | str, bytes | str] = self.redis.hgetall(self.keys.job(job_id))  # type: ignore[assignment]
        return decode_record(job_id, raw)

    def transition(
        self,
        job_id: str,
        allowed: Iterable[JobStatus],
        new: JobStatus,
        event: JobEvent | None,
        fields: Mapping[str, object] | None = None,
        attempt: Attempt | None = None,
        if_attempts: int | None = None,
    ) -> bool:
        """Set `new` (and fields) only if the current status is in `allowed` (and, given
        `attempt`, the record still names it; given `if_attempts`, the record still counts that
        many attempts: a start lands once, however often it is sent); True if it did."""
        number = attempt.number if attempt else if_attempts
        args: list[str] = [
            ",".join(s.value for s in allowed),
            new.value,
            event.model_dump_json() if event else "",
            str(self.result_ttl_s if new.is_terminal else 0),
            attempt.worker if attempt else "",
            "" if number is None else str(number),
            job_id,
            repr(time.time()),
        ]
        for name, value in (fields or {}).items():
            args += [name, _encode(value)]
        keys = [self.keys.job(job_id), self.keys.events(job_id), self.keys.queued_index()]
        return bool(self._transition(keys=keys, args=args))

    def report_progress(
        self, job_id: str, progress: ProgressRecord, attempt: Attempt | None = None
    ) -> bool:
        event = JobEvent(
            type="progress", status=JobStatus.RUNNING, at=time.time(), progress=progress
        )
        return self.transition(
            job_id, [JobStatus.RUNNING], JobStatus.RUNNING, event, {"progress": progress},
            attempt,
        )

    def head(self, job_id: str) -> RecordHead | None:
        """The job's status and holder, read without decoding the rest; None when it is gone."""
        status, worker, attempts = self.redis.hmget(
            self.keys.job(job_id), ["status", "worker", "attempts"]
        )
        if status is None:
            return None
        return RecordHead(
            status=as_text(status),
            worker=as_text(worker) if worker else None,
            attempts=int(attempts or 0),
        )

    def holds(self, job_id: str, attempt: Attempt) -> bool:
        """Whether the job is still `running` as `attempt`."""
        head = self.head(job_id)
        return head is not None and head.status == JobStatus.RUNNING.value and (
            head.worker, head.attempts
        ) == (attempt.worker, attempt.number)

    def request_cancel(self, job_id: str) -> None:
        self.redis.set(self.keys.cancel(job_id), "1", ex=self.result_ttl_s)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.keys.cancel(job_id)))

    def read_events(
        self, job_id: str, after: str = "0", block_ms: int | None = None
    ) -> list[tuple[str, JobEvent]]:
        """Events after stream id `after`, waiting up to `block_ms` for the first one."""
        reply = self.redis.xread({self.keys.events(job_id): after}, block=block_ms, count=100)
        return decode_events(reply)


def decode_events(reply: object) -> list[tuple[str, JobEvent]]:
    """Decode an XREAD reply (list of [stream, [(id, {b'event': json})]])."""
    out: list[tuple[str, JobEvent]] = []
    for _stream, entries in reply or []:  # type: ignore[attr-defined]
        for entry_id, data in entries:
            payload = data.get(b"event") or data.get("event")
            out.append((as_text(entry_id), JobEvent.model_validate_json(payload)))
    return out


def _encode(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, JobStatus):
        return value.value
    if hasattr(value, "model_dump_json"):
        return value.model_dump_json()  # type: ignore[no-any-return]
    if isinstance(value, list):
        return "[" + ",".join(_encode(v) for v in value) + "]"
    return json.dumps(value)


class UnreadableRecord(ValueError):
    """A job hash this release cannot decode: a field written by a newer release (a value it
    does not know) during a rolling upgrade, or a damaged hash."""

    def __init__(self, job_id: str, cause: Exception) -> None:
        super().__init__(
            f"the record of job {job_id} cannot be read by this release (written by a newer "
            f"one?): {type(cause).__name__}: {cause}"
        )


def decode_record(job_id: str, raw: Mapping[Any, bytes | str]) -> JobRecord | None:
    """A job hash as HGETALL returns it -> the record; None when the hash does not exist.

    Public so an asyncio reader (the API's hot GET path) decodes exactly like JobStore.get.
    Raises UnreadableRecord for a hash it cannot decode.
    """
    if not raw:
        return None
    try:
        return _decode(job_id, {as_text(k): as_text(v) for k, v in raw.items()})
    except (ValueError, KeyError, TypeError) as exc:  # pydantic's and json's errors included
        raise UnreadableRecord(job_id, exc) from exc


def _decode(job_id: str, f: dict[str, str]) -> JobRecord:
    def num(name: str) -> float | None:
        return float(f[name]) if f.get(name) else None

    return JobRecord(
        id=job_id,
        status=JobStatus(f["status"]),
        params=GenerationParams.model_validate_json(f["params"]),
        created_at=float(f["created_at"]),
        started_at=num("started_at"),
        finished_at=num("finished_at"),
        attempts=int(f.get("attempts", "0")),
        worker=f.get("worker") or None,
        progress=ProgressRecord.model_validate_json(f["progress"]) if f.get("progress") else None,
        outputs=[OutputRecord.model_validate(o) for o in json.loads(f.get("outputs", "[]"))],
        error=ErrorInfo.model_validate_json(f["error"]) if f.get("error") else None,
        metrics=JobMetrics.model_validate_json(f["metrics"]) if f.get("metrics") else JobMetrics(),
        origin=JobOrigin.model_validate_json(f["origin"]) if f.get("origin") else JobOrigin(),
    )


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
