"""Service overhead and GET-status throughput, against the real stack on loopback.

Starts one API process (uvicorn, `python -m service.main`) and one worker (`python -m
worker.main`) on a real Redis, then measures:

1. service overhead per job = end-to-end time (POST sent -> `succeeded` event received over
   SSE) minus the engine's own time (`metrics.inference_s`, the sum of its stage timings):
   validation, enqueue, dequeue, state writes, progress events, PNG encoding, storage, SSE;
2. GET /v1/generations/{id} requests per second with one API process, from concurrent clients.

Prints a table and writes JSON under bench/results/. Usage:
    .venv/bin/python bench/service_overhead.py [--jobs 20] [--seconds 10] [--concurrency 32]
The load generator shares the machine with the server: on few cores it caps the throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from redis import Redis
from redis.exceptions import RedisError

from service.all_in_one import wait_until_ready

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def start_stack(
    redis_url: str, prefix: str, data_dir: Path, port: int
) -> list[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFCASCADE_")}
    env.update(
        SELFCASCADE_REDIS_URL=redis_url,
        SELFCASCADE_REDIS_PREFIX=prefix,
        SELFCASCADE_DATA_DIR=str(data_dir),
        PYTHONPATH=str(REPO),
    )
    log = (data_dir / "stack.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker.main", "--log-level", "warning"],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    api = subprocess.Popen(
        [sys.executable, "-m", "service.main", "--port", str(port), "--log-level", "warning"],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    return [worker, api]


def forget(redis_url: str, prefix: str) -> None:
    """Delete the run's keys: the job store's and RQ's queues and registries carry the prefix
    (RQ's job hashes do not; they expire with their results)."""
    redis = Redis.from_url(redis_url)
    for key in redis.scan_iter(match=f"*{prefix}*", count=1000):
        redis.delete(key)
    for name in redis.smembers("rq:queues"):  # type: ignore[union-attr]
        if prefix in name.decode():
            redis.srem("rq:queues", name)
    redis.close()


def run_job(client: httpx.Client, body: dict) -> tuple[float, float, dict]:
    """(end-to-end seconds, engine seconds, final record) for one job, finished seen via SSE."""
    start = time.perf_counter()
    created = client.post("/v1/generations", json=body)
    created.raise_for_status()
    job_id = created.json()["id"]
    with client.stream("GET", f"/v1/generations/{job_id}/events", timeout=300) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: ") and line[7:] in ("succeeded", "failed", "canceled"):
                break
    end_to_end = time.perf_counter() - start
    record = client.get(f"/v1/generations/{job_id}").json()
    if record["status"] != "succeeded":
        raise SystemExit(f"job {job_id} ended {record['status']}: {record['error']}")
    return end_to_end, float(record["metrics"]["inference_s"]), record


async def get_throughput(url: str, path: str, seconds: float, concurrency: int) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:

        async def loop() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                response = await client.get(path)
                latencies.append(time.perf_counter() - t)
                errors += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "latency_p50_ms": percentile(latencies, 0.5) * 1000,
        "latency_p99_ms": percentile(latencies, 0.99) * 1000,
        "concurrency": concurrency,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/12",
        help="a Redis to run on (not one whose databases your tests use); the run's keys go "
        "under a fresh prefix and are deleted afterwards",
    )
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="sc-bench-") as tmp:
        children = start_stack(args.redis_url, prefix, Path(tmp), port)
        try:
            wait_until_ready(url, children)
            body = {"prompt": "a bench", "width": args.size, "height": args.size,
                    "steps": args.steps}
            with httpx.Client(base_url=url, timeout=30) as client:
                model = client.get("/v1/models").json()["data"][0]["name"]  # what it served
                run_job(client, body)  # warm-up: first-call allocations in the engine
                samples = [run_job(client, {**body, "seed": i}) for i in range(args.jobs)]
                job_id = samples[-1][2]["id"]
            throughput = asyncio.run(
                get_throughput(url, f"/v1/generations/{job_id}", args.seconds, args.concurrency)
            )
            # Same load generator on a route that touches nothing: separates the client's own
            # limit (it shares the CPUs) from the cost of the status route.
            baseline = asyncio.run(get_throughput(url, "/healthz", args.seconds, args.concurrency))
        finally:
            for child in children:
                child.terminate()
            for child in children:
                child.wait(timeout=30)
            try:
                forget(args.redis_url, prefix)
            except RedisError as exc:  # never in place of the run's own error
                print(f"could not delete the run's keys under {prefix}: {exc}", file=sys.stderr)

    e2e = [s[0] for s in samples]
    engine = [s[1] for s in samples]
    overhead = [a - b for a, b in zip(e2e, engine, strict=True)]
    result = {
        "benchmark": "service_overhead",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "job": {"size": args.size, "steps": args.steps, "model": model, "jobs": args.jobs},
        "end_to_end_s": {"median": statistics.median(e2e), "p95": percentile(e2e, 0.95)},
        "engine_s": {"median": statistics.median(engine), "p95": percentile(engine, 0.95)},
        "overhead_s": {"median": statistics.median(overhead), "p95": percentile(overhead, 0.95),
                       "min": min(overhead), "max": max(overhead)},
        "get_status": throughput,
        "get_healthz_baseline": baseline,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"service_overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))

    rows = [
        ("end-to-end per job (s)", result["end_to_end_s"]["median"], result["end_to_end_s"]["p95"]),
        ("engine time per job (s)", result["engine_s"]["median"], result["engine_s"]["p95"]),
        ("service overhead (s)", result["overhead_s"]["median"], result["overhead_s"]["p95"]),
    ]
    print(f"\nservice overhead: {args.jobs} jobs, model {model}, {args.size}px, {args.steps} steps")
    print(f"{'metric':<28}{'median':>10}{'p95':>10}")
    for name, median, p95 in rows:
        print(f"{name:<28}{median:>10.3f}{p95:>10.3f}")
    t = throughput
    print(f"\nGET /v1/generations/{{id}}, one API process, {t['concurrency']} concurrent clients")
    print(f"{'requests/s':<28}{t['requests_per_s']:>10.0f}")
    print(f"{'latency p50 / p99 (ms)':<28}{t['latency_p50_ms']:>10.1f}{t['latency_p99_ms']:>10.1f}")
    print(f"{'errors':<28}{t['errors']:>10d}")
    print(f"{'baseline GET /healthz req/s':<28}{baseline['requests_per_s']:>10.0f}")
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
