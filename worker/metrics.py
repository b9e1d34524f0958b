"""Prometheus metrics of one worker, served on ``--metrics-port`` (beside its probes: :mod:`worker.probes`).

Every series carries the model and device as labels, so a dashboard over many workers can split by
them. A private registry per worker keeps several workers in one process (tests) apart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .probes import WorkerProbes, serve_http

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class WorkerMetrics:
    def __init__(self, model: str, device: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        labels = ["model", "device"]
        r = self.registry
        self.items = Counter("queuebert_items", "Items completed, by outcome (ok or error).",
                             labels + ["outcome"], registry=r)
        self.jobs = Counter("queuebert_jobs", "RQ jobs completed, by outcome (finished or failed).",
                            labels + ["outcome"], registry=r)
        self.batch_texts = Histogram("queuebert_batch_texts", "Texts per forward batch.", labels,
                                     buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("queuebert_batch_padded_tokens", "Padded tokens per forward batch.", labels,
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.queue_wait = Histogram("queuebert_queue_wait_seconds", "Seconds from enqueue to the start of compute.",
                                    labels, buckets=SECONDS_BUCKETS, registry=r)
        self.forward = Histogram("queuebert_forward_seconds", "Seconds per forward batch.", labels,
                                 buckets=SECONDS_BUCKETS, registry=r)
        self.load = Gauge("queuebert_model_load_seconds", "Seconds the model took to load.", labels, registry=r)
        self.redis_down = Gauge("queuebert_redis_down",
                                "1 while Redis refuses this component's commands (OOM, READONLY, unreachable...) "
                                "and the worker waits and retries.", labels + ["component"], registry=r)
        self.labels = {"model": model, "device": device}
        # Create every series up front so a scrape shows all families before the first batch.
        for metric in (self.batch_texts, self.batch_tokens, self.queue_wait, self.forward, self.load):
            metric.labels(**self.labels)
        for outcome in ("ok", "error"):
            self.items.labels(**self.labels, outcome=outcome)
        for outcome in ("finished", "failed"):
            self.jobs.labels(**self.labels, outcome=outcome)
        for component in ("take", "complete", "heartbeat", "maintenance"):
            self.redis_down.labels(**self.labels, component=component)

    def serve(self, port: int, addr: str = "0.0.0.0", probes: WorkerProbes | None = None) -> None:
        """Metrics on ``port``, with the worker's ``/readyz`` and ``/livez`` when ``probes`` is given."""
        serve_http(self.registry, port, addr, probes)

    def observe_batches(self, per_batch: list[tuple[int, int, float]], waits: list[float]) -> None:
        texts, tokens, forward = (m.labels(**self.labels) for m in (self.batch_texts, self.batch_tokens, self.forward))
        for rows, padded, seconds in per_batch:
            texts.observe(rows)
            tokens.observe(padded)
            forward.observe(seconds)
        wait = self.queue_wait.labels(**self.labels)
        for w in waits:
            wait.observe(max(w, 0.0))

    def count(self, ok_items: int, error_items: int, finished_jobs: int, failed_jobs: int) -> None:
        self.items.labels(**self.labels, outcome="ok").inc(ok_items)
        self.items.labels(**self.labels, outcome="error").inc(error_items)
        self.jobs.labels(**self.labels, outcome="finished").inc(finished_jobs)
        self.jobs.labels(**self.labels, outcome="failed").inc(failed_jobs)
