"""The compute loop: batches from the pool through the model, each job handed on as soon as its
last item is done.

It runs in the worker's main thread. The pool (:class:`~worker.scheduler.ItemPool`) decides
which items make the next batch; the engine runs it; :meth:`worker.slots.Inflight.settle` records
the results (the taker may be settling other items of the same jobs) and names the jobs this batch
finished, which go to the completer at once.

On an asynchronous device (CUDA) two batches overlap: the next one is cut, collated and launched
while the device still runs the current one, and only then are the current one's logits waited
for and scored, so the device is not idle while the host scores, records and cuts. A batch is
launched only if the pool would cut it at once; compute never waits for company while a forward
is under way. Every launched batch is finished before the loop ends, a stop included.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog

from .engine import BatchStats, Engine, Launched
from .metrics import WorkerMetrics
from .scheduler import Entry, ItemPool
from .slots import Finished, Inflight, Slot

log = structlog.get_logger(__name__)


class StatsWindow:
    """Batch figures summed over about a second, for one log line (a line per batch would be
    a dozen a second)."""

    def __init__(self, every: float = 1.0):
        self.every = every
        self._reset()

    def _reset(self) -> None:
        self.stats = BatchStats()
        self.jobs = 0
        self.max_wait = 0.0
        self.since = time.monotonic()

    def add(self, stats: BatchStats, jobs: int, waits: list[float]) -> None:
        s = self.stats
        s.batches += stats.batches
        s.texts += stats.texts
        s.real_tokens += stats.real_tokens
        s.padded_tokens += stats.padded_tokens
        s.forward_seconds += stats.forward_seconds
        self.jobs += jobs
        self.max_wait = max([self.max_wait, *waits])

    def due(self) -> bool:
        return time.monotonic() - self.since >= self.every

    def flush(self) -> dict[str, Any]:
        """The window's figures as log fields; the next window starts empty."""
        s = self.stats
        out = {"jobs": self.jobs, "texts": s.texts, "batches": s.batches, "padded_tokens": s.padded_tokens,
               "padding_ratio": round(s.padding_ratio, 3), "forward_ms": round(1000 * s.forward_seconds, 1),
               "queue_wait_ms": round(1000 * self.max_wait, 1)}
        self._reset()
        return out


class Compute:
    """Runs batches until stopped, or until the pool is empty and the taker has ended a burst."""

    def __init__(self, *, engine: Engine, pool: ItemPool, inflight: Inflight, finished: Finished,
                 max_wait: float, metrics: WorkerMetrics | None, stop: threading.Event,
                 taker_done: threading.Event):
        self.engine = engine
        self.pool = pool
        self.inflight = inflight
        self.finished = finished
        self.max_wait = max_wait  # seconds a batch that could still grow waits for company
        self.metrics = metrics
        self._stop = stop
        self._taker_done = taker_done

    def run(self) -> None:
        engine, pool = self.engine, self.pool
        window = StatsWindow()
        running: tuple[list[Entry], Launched] | None = None  # launched, not yet finished
        while True:
            batch = None
            waited = False
            if not self._stop.is_set():
                if running is None:
                    batch, waited = pool.next_batch(self.max_wait), True
                elif engine.asynchronous:
                    batch = pool.ready_batch(self.max_wait)
            launched = None
            if batch is not None:
                launched = batch, engine.launch([e.item for e in batch], [e.options for e in batch],
                                                [e.ids for e in batch])
            if running is not None:
                self._finish(*running, window)
            running = launched
            if running is None and (self._stop.is_set() or (waited and self._taker_done.is_set())):
                break
        if window.stats.batches:
            log.info("batch", pool=len(pool), **window.flush())

    def _finish(self, batch: list[Entry], launched: Launched, window: StatsWindow) -> None:
        """Wait for a batch's logits, score them, settle its items and hand on the jobs it finished."""
        pool = self.pool
        stats = BatchStats()
        results = self.engine.finish(launched, stats)
        waits: list[float] = []
        wall = time.time()
        for e in batch:
            slot: Slot = e.owner
            if not slot.computing:  # the job's first forward: how long it queued
                slot.computing = True
                if slot.job.enqueued_at:
                    waits.append(wall - slot.job.enqueued_at)
        finished = self.inflight.settle((e.owner, e.index, result) for e, result in zip(batch, results))
        self.finished.put(finished)
        if self.metrics is not None:
            self.metrics.observe_batches(stats.per_batch, waits)
        window.add(stats, len(finished), waits)
        # Per forward, at debug level: how the pool was cut (the info line sums ~1 s of them).
        # From the engine's own record, so an OOM split shows as the forwards it really ran.
        for rows, padded, seconds in stats.per_batch:
            log.debug("forward", rows=rows, width=padded // rows, left_in_pool=len(pool),
                      ms=round(1000 * seconds, 1))
        if window.due():
            log.info("batch", pool=len(pool), **window.flush())
