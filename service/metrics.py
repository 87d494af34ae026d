"""Prometheus metrics: request counts and latencies here, job numbers read from Redis at scrape.

Each app gets its own CollectorRegistry, so several apps in one process (tests) never collide.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import redis.exceptions
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract import histograms
from contract.jobs import Priority
from contract.queueing import PRIORITIES
from contract.webhook_queue import read_outcomes
from service.live_workers import live_worker_info
from service.services import ApiServices
from service.worker_demand import running_jobs

log = logging.getLogger(__name__)


class RequestMetrics:
    """ASGI middleware counting requests by route template (not raw path: ids would explode)."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "selfcascade_http_requests_total",
            "HTTP requests",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "selfcascade_http_request_seconds",
            "HTTP request latency until the response starts",
            ["method", "route"],
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = _route_template(scope)
                self.latency.labels(_method(scope), route).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            self.requests.labels(_method(scope), _route_template(scope), str(status)).inc()


# Label values come from a fixed set: a client inventing methods must not invent time series.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _method(scope: Scope) -> str:
    method: str = scope["method"]
    return method if method in _METHODS else "other"


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class JobCollector(Collector):
    """Queue depth, running jobs, finished jobs by status, queue-wait and inference histograms."""

    def __init__(self, services: ApiServices) -> None:
        self.services = services

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        s = self.services
        # This process's own, Redis or not: against SELFCASCADE_MAX_EVENT_STREAMS, when to scale.
        streams = GaugeMetricFamily(
            "selfcascade_event_streams_open", "Event streams this API process holds open"
        )
        streams.add_metric([], s.open_event_streams)
        yield streams
        try:
            waiting = {
                (m.name, p): len(s.queue_for(m.name, p)) for p in PRIORITIES for m in s.models
            }
            queued = sum(waiting.values())
            running = running_jobs(s.queues)
            finished = histograms.read_counts(s.redis, s.keys, histograms.JOBS_FINISHED)
            waits = histograms.read_histogram(s.redis, s.keys, histograms.QUEUE_WAIT)
            infer = histograms.read_histogram(s.redis, s.keys, histograms.INFERENCE)
            e2e = histograms.read_histogram(s.redis, s.keys, histograms.E2E_LATENCY)
            webhooks = read_outcomes(s.redis, s.keys)
            workers = live_worker_info(s.redis, s.keys)
        except redis.exceptions.RedisError as exc:
            log.warning("metrics: redis unavailable: %s", exc)
            up = GaugeMetricFamily("selfcascade_redis_up", "Redis reachable at scrape")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("selfcascade_redis_up", "Redis reachable at scrape")
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("selfcascade_queue_depth", "Generations waiting in the queue")
        depth.add_metric([], queued)
        yield depth
        jobs = GaugeMetricFamily(
            "selfcascade_jobs", "Generations by live status", labels=["status"]
        )
        jobs.add_metric(["queued"], queued)
        jobs.add_metric(["running"], running)
        yield jobs
        done = CounterMetricFamily(
            "selfcascade_jobs_finished", "Generations finished, by status", labels=["status"]
        )
        for status, count in sorted(finished.items()):
            done.add_metric([status], count)
        yield done
        for name, (buckets, total), help_text in (
            ("selfcascade_queue_wait_seconds", waits, "Time from accepted to started"),
            ("selfcascade_inference_seconds", infer, "Engine time per generation"),
        ):
            hist = HistogramMetricFamily(name, help_text)
            hist.add_metric([], buckets, total)
            yield hist
        yield from _inference_server_metrics(waiting, running, finished, waits, infer, e2e)
        yield from _webhook_and_gpu_metrics(webhooks, workers)


HistogramData = tuple[list[tuple[str, float]], float]


def _inference_server_metrics(
    waiting: dict[tuple[str, Priority], int],
    running: int,
    finished: dict[str, int],
    waits: HistogramData,
    infer: HistogramData,
    e2e: HistogramData,
) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
    """The same numbers under the names vLLM and TGI dashboards expect (seconds throughout)."""
    gauge = GaugeMetricFamily(
        "selfcascade_num_requests_waiting",
        "Generations queued, by model and priority",
        labels=["model", "priority"],
    )
    for (model, priority), count in waiting.items():
        gauge.add_metric([model, priority], count)
    yield gauge
    gauge = GaugeMetricFamily("selfcascade_num_requests_running", "Generations running now")
    gauge.add_metric([], running)
    yield gauge
    done = CounterMetricFamily(
        "selfcascade_request_success", "Generations finished, by final status", labels=["status"]
    )
    for status, count in sorted(finished.items()):
        done.add_metric([status], count)
    yield done
    for name, (buckets, total), help_text in (
        ("selfcascade_request_queue_time_seconds", waits, "Queue time: accepted to started"),
        ("selfcascade_request_inference_time_seconds", infer, "Inference (engine) time"),
        ("selfcascade_e2e_request_latency_seconds", e2e, "End-to-end: accepted to finished"),
    ):
        hist = HistogramMetricFamily(name, help_text)
        hist.add_metric([], buckets, total)
        yield hist


def _webhook_and_gpu_metrics(
    outcomes: dict[str, int], workers: list[dict[str, Any]]
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    deliveries = CounterMetricFamily(
        "selfcascade_webhook_deliveries",
        "Webhook delivery attempts by outcome (delivered, retried, failed, refused)",
        labels=["outcome"],
    )
    for outcome, count in sorted(outcomes.items()):
        deliveries.add_metric([outcome], count)
    yield deliveries
    memory = GaugeMetricFamily(
        "selfcascade_gpu_memory_used_bytes",
        "CUDA memory allocated by each live worker",
        labels=["worker", "device"],
    )
    for info in workers:
        for device, used in (info.get("gpu_memory_bytes") or {}).items():
            memory.add_metric([str(info.get("name")), device], used)
    yield memory


def metrics_request_registry(request: Request) -> CollectorRegistry:
    registry: CollectorRegistry = request.app.state.metrics_registry
    return registry
