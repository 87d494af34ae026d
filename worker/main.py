"""`selfcascade-worker`: load the configured models once, then serve generations from RQ."""

from __future__ import annotations

import argparse
import logging
import socket
import uuid

from contract.keys import RedisKeys
from contract.log_format import configure_logging
from contract.queueing import worker_queues
from contract.redis_connection import connect
from contract.settings import (
    ModelsFileError,
    load_model_specs,
    select_worker_models,
    settings_from_env,
)
from contract.state import JobStore
from contract.storage import build_storage
from selfcascade.errors import SelfCascadeError
from worker.process import GenerationWorker
from worker.resident import ModelRefused, WorkerRuntime, install, load_models

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="selfcascade generation worker")
    parser.add_argument("--name", help="worker name (default: <hostname>-<8 random hex digits>)")
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    settings = settings_from_env()
    configure_logging(settings.log_format, args.log_level)
    if not settings.redis_url:
        raise SystemExit("SELFCASCADE_REDIS_URL (or REDIS_URL) must be set for the worker")
    try:
        specs = load_model_specs(settings)
        served = select_worker_models(specs, settings)
    except ModelsFileError as exc:  # its one line is the whole story; a traceback would bury it
        raise SystemExit(str(exc)) from None
    # The blocking dequeue needs a socket timeout longer than its own wait (RQ adjusts it).
    redis = connect(settings.redis_url, socket_timeout=60.0)
    keys = RedisKeys(settings.redis_prefix)
    storage = build_storage(settings)
    storage.check()
    name = args.name or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    runtime = WorkerRuntime(
        settings=settings,
        store=JobStore(redis, keys, settings.result_ttl_s),
        storage=storage,
        worker_name=name,
    )
    try:
        runtime.models = load_models(served, settings)
    except (ModelRefused, SelfCascadeError) as exc:  # a missing folder, a bad checkpoint...
        raise SystemExit(f"cannot serve the configured models: {exc}") from None
    install(runtime)

    worker = GenerationWorker(
        # Only the queues of the models held here, priority-major (RQ dequeues from the first
        # non-empty queue), then the shared queues of older releases.
        worker_queues(redis, settings, runtime.models),
        runtime=runtime,
        connection=redis,
        name=name,
    )
    worker.start_reaper()
    log.info("worker %s ready with models %s", name, ", ".join(runtime.models))
    try:
        worker.work(burst=args.burst, with_scheduler=False)
    finally:
        worker.stop_reaper()


if __name__ == "__main__":
    main()
