"""``queuebert exporter``: the queues' depth in items, as Prometheus gauges an autoscaler reads.

Why a process of its own: workers scaled to zero export nothing, which is exactly when an
autoscaler must see their queue fill; the gateway runs as several replicas (each would report the
same queue, and each scrape would cost Redis again) and is not part of every deployment. One small
exporter per Redis (light install: ``queuebert[http]``, no torch), scraped by Prometheus, is
where KEDA's prometheus scaler reads ``queuebert_queue_items`` (docker/k8s/).

Each scrape reads Redis then (one script call per queue, in one round trip: see
:mod:`queuebert.queue_depth`), so a value is never older than the scrape. A scrape whose Redis
read fails answers ``queuebert_exporter_redis_up 0`` and no queue series: an autoscaler then sees
no value (KEDA: ``ignoreNullValues: "false"`` turns that into an error and its fallback replicas)
rather than a zero that would scale workers away while their queue is full.

Series (``state``: ``waiting``, in the queue or RQ's intermediate list; ``started``, held by a
worker, or by a dead one until its jobs are recovered into waiting):
- ``queuebert_queue_items{queue,state}``: items (texts) of those jobs;
- ``queuebert_queue_jobs{queue,state}``: the jobs themselves (RQ's own counts);
- ``queuebert_queue_items_estimated{queue,state}``: 1 when part of the items were estimated
  (more than ``depth_scan`` jobs);
- ``queuebert_queue_oldest_item_age_seconds{queue}``: how long the oldest waiting item has waited;
- ``queuebert_exporter_redis_up``, ``queuebert_exporter_scrape_seconds``.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis
import structlog
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from queuebert.connection import connect, redact
from queuebert.queue_depth import QueueDepth, known_queues, read_depths
from queuebert.settings import ExporterSettings

log = structlog.get_logger(__name__)

#: Seconds between two log lines about the same Redis trouble (a scrape every 15 s would
#: otherwise log every 15 s for as long as it lasts).
_LOG_EVERY = 60.0


class QueueDepthCollector(Collector):
    """Reads every queue's depth at each scrape (``prometheus_client`` calls :meth:`collect`)."""

    def __init__(self, connection: redis.Redis, settings: ExporterSettings):
        self.connection = connection
        self.settings = settings
        self._logged_at = 0.0
        self._down = False

    def depths(self) -> list[QueueDepth]:
        queues = sorted(set(self.settings.queues) | set(known_queues(self.connection)))
        return read_depths(self.connection, queues, scan=self.settings.depth_scan, sample=self.settings.depth_sample)

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily("queuebert_exporter_redis_up",
                               "1 when this scrape read the queues from Redis, else 0 (and no queue series).")
        seconds = GaugeMetricFamily("queuebert_exporter_scrape_seconds", "Seconds this scrape spent reading Redis.")
        try:
            depths = self.depths()
        except redis.RedisError as exc:
            self._trouble(exc)
            up.add_metric([], 0)
            seconds.add_metric([], time.perf_counter() - started)
            yield from (up, seconds)
            return
        if self._down:
            self._down = False
            log.info("redis answers the exporter again")
        up.add_metric([], 1)
        seconds.add_metric([], time.perf_counter() - started)
        yield from (up, seconds)
        yield from self.families(depths)

    @staticmethod
    def families(depths: list[QueueDepth], now: float | None = None) -> Iterator[Metric]:
        now = time.time() if now is None else now
        labels = ["queue", "state"]
        items = GaugeMetricFamily("queuebert_queue_items", "Items (texts) of the queue's jobs, waiting or started.",
                                  labels=labels)
        jobs = GaugeMetricFamily("queuebert_queue_jobs", "RQ jobs of the queue, waiting or started.", labels=labels)
        estimated = GaugeMetricFamily("queuebert_queue_items_estimated",
                                      "1 when some of queuebert_queue_items was estimated from a sample of the jobs.",
                                      labels=labels)
        age = GaugeMetricFamily("queuebert_queue_oldest_item_age_seconds",
                                "Seconds the oldest waiting item of the queue has waited (0: none waits).",
                                labels=["queue"])
        for d in depths:
            for state, n_items, n_jobs, est in (("waiting", d.waiting_items, d.waiting_jobs, d.waiting_estimated),
                                                ("started", d.started_items, d.started_jobs, d.started_estimated)):
                items.add_metric([d.queue, state], n_items)
                jobs.add_metric([d.queue, state], n_jobs)
                estimated.add_metric([d.queue, state], 1 if est else 0)
            age.add_metric([d.queue], d.oldest_age(now))
        yield from (items, jobs, estimated, age)

    def _trouble(self, exc: redis.RedisError) -> None:
        now = time.monotonic()
        if not self._down or now - self._logged_at >= _LOG_EVERY:
            log.warning("cannot read the queues from Redis: this scrape has no queue series", error=str(exc))
            self._logged_at = now
        self._down = True


def build_registry(connection: redis.Redis, settings: ExporterSettings) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(QueueDepthCollector(connection, settings))
    return registry


def run_exporter(settings: ExporterSettings) -> int:
    """Serve ``/metrics`` on ``settings.host:port`` until SIGTERM or SIGINT."""
    connection = connect(settings.redis_url, retries=0, check=False, socket_timeout=settings.redis_timeout)
    # prometheus_client serves from a daemon thread, which ends with the process.
    start_http_server(settings.port, addr=settings.host, registry=build_registry(connection, settings))
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    log.info("exporting queue depth", host=settings.host, port=settings.port, redis=redact(settings.redis_url),
             queues=settings.queues or "every queue RQ knows")
    stop.wait()
    log.info("exporter stopped")
    return 0
