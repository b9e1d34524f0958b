"""The completer: writes the outcome of every finished job, in its own thread.

Successful jobs go through :meth:`JobStore.complete <worker.job_store.JobStore.complete>`: RQ
result, finished registry, run-stream record and the worker's counters for all jobs finished
meanwhile in one script call; jobs using RQ features that path does not implement, and every job
that fails, go through RQ's own handlers (:mod:`worker.rq_completion` decides which). A Redis
error is weather (:mod:`worker.outage`): the same slots are written again, minus those already
written, until Redis accepts them; meanwhile the taker takes nothing new. The slots reach this
thread through :class:`~worker.slots.Finished` and are this thread's alone from then on
(:mod:`worker.slots`).
"""

from __future__ import annotations

import threading

import redis
import structlog
from rq.worker import SimpleWorker, WorkerStatus

from queuebert.schema import is_error

from . import rq_completion
from .job_rows import settled
from .job_store import JobStore
from .metrics import WorkerMetrics
from .outage import Outage
from .slots import Finished, Inflight, Slot

log = structlog.get_logger(__name__)


class Completer:
    """Completes finished jobs for ``worker``, whose RQ methods (``handle_job_failure``,
    ``set_state``) and counters in Redis it uses as RQ's own worker would."""

    def __init__(self, *, worker: SimpleWorker, store: JobStore, inflight: Inflight, finished: Finished,
                 outage: Outage, metrics: WorkerMetrics | None, abandon: threading.Event):
        self.worker = worker
        self.connection = worker.connection
        self.store = store
        self.inflight = inflight
        self.finished = finished
        self.outage = outage
        self.metrics = metrics
        #: Set when shutdown can wait no longer (Redis refusing writes): stop retrying.
        self._abandon = abandon
        self.completed_jobs = 0
        self.completed_items = 0
        # Whether the fast path suits this RQ is read from RQ's source: once, here, while the
        # worker starts, rather than on its first completion (a few ms of the first results).
        rq_completion.fast_path_usable()

    def run(self) -> None:
        """Until :meth:`Finished.close`: take everything finished, write it, retry while Redis refuses."""
        while (slots := self.finished.next()) is not None:
            while True:
                try:
                    self.complete(slots)
                    self.outage.recovered()
                    break
                except redis.RedisError as exc:
                    # Results are keyed by job, the run record is once per job, and each slot
                    # remembers what is already written: retrying is safe. The results stay here
                    # until Redis accepts them.
                    if self._abandon.wait(self.outage.failed(exc)):
                        log.warning("stopping with jobs not completed: RQ recovers them when their "
                                    "executions expire", jobs=len([s for s in slots if not s.written]))
                        return
                    slots = slots + self.finished.more()  # one script call for all finished meanwhile

    def complete(self, slots: list[Slot]) -> None:
        """Write every slot's outcome and stop holding it. On a Redis error the caller retries
        with the same slots; those already written (``slot.written``) are not written again."""
        todo = [s for s in slots if not s.written]
        ok = [s for s in todo if s.error is None]
        failed = [s for s in todo if s.error is not None]
        item_errors = items = 0
        for slot in ok:
            item_errors += sum(1 for r in settled(slot.results) if is_error(r))
            items += len(slot.results)
        try:
            rq_completion.complete(self.worker, self.store, ok)
        finally:
            # Written ones are no longer held (nor heartbeated, nor given back), even when a
            # Redis error stopped the round part way.
            self.inflight.release([s for s in ok if s.written])
        for slot in failed:
            rq_completion.fail(self.worker, self.store, slot, slot.error or "job failed", slot.error_kind)
            self._written(slot)
        if not self.inflight.busy():
            try:
                self.worker.set_state(WorkerStatus.IDLE)
            except redis.RedisError:
                pass  # cosmetic (`rq info`); the next take or heartbeat sets it again
        self.completed_jobs += len(ok)
        self.completed_items += items
        if self.metrics is not None:
            self.metrics.count(items - item_errors, item_errors, len(ok), len(failed))

    def _written(self, slot: Slot) -> None:
        """In Redis now: not written again on a retry, no longer held (nor heartbeated, nor given
        back at a stop)."""
        slot.written = True
        self.inflight.release([slot])
