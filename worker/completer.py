"""The completer: writes the outcome of every finished job, in its own thread.

Successful jobs go through :meth:`JobStore.complete <worker.job_store.JobStore.complete>`: RQ
result, finished registry, run-stream record and the worker's counters for all jobs finished
meanwhile in one script call. A job RQ would delete on success (result TTL 0) and a job that fails
as a whole take RQ's own Python path. A Redis error is weather (:mod:`worker.outage`): the same
slots are written again, minus those already written, until Redis accepts them; meanwhile the
taker takes nothing new. The slots reach this thread through :class:`~worker.slots.Finished`
and are this thread's alone from then on (:mod:`worker.slots`).
"""

from __future__ import annotations

import threading

import redis
import structlog
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from producer.job import QueuebertJob
from producer.results import encode_results, record_job
from producer.schema import is_error
from producer.serializer import JSONSerializer
from producer.settings import DEFAULT_RESULT_TTL

from .job_store import Completion, JobStore
from .metrics import WorkerMetrics
from .outage import Outage
from .slots import Finished, Inflight, Slot
from .tasks import job_error_results

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
        store = self.store
        default_ttl = self.worker.default_result_ttl
        todo = [s for s in slots if not s.written]
        ok = [s for s in todo if s.error is None]
        failed = [s for s in todo if s.error is not None]
        fast: list[Completion] = []
        fast_slots: list[Slot] = []
        slow: list[Slot] = []
        item_errors = items = 0
        for slot in ok:
            errors = sum(1 for r in slot.results if is_error(r))  # type: ignore[arg-type]
            item_errors += errors
            items += len(slot.results)
            if store.fast_path(slot.job, default_ttl):
                run = slot.request.run if slot.request is not None else None
                fast.append(Completion(slot.job, encode_results(slot.results), run,  # type: ignore[arg-type]
                                       len(slot.results), errors))
                fast_slots.append(slot)
            else:
                slow.append(slot)
        with_dependents = set(store.complete(fast, default_ttl))
        self.inflight.release(fast_slots)  # their executions are gone: nothing to heartbeat or give back
        for slot in fast_slots:
            slot.written = True
            if slot.job.id in with_dependents:
                self._enqueue_dependents(slot.queue, slot.job.id)
        for slot in slow:
            self._complete_without_keeping(slot)
            self._written(slot)
        for slot in failed:
            self._fail(slot)
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

    def _enqueue_dependents(self, queue: Queue, job_id: str) -> None:
        try:
            job = QueuebertJob.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError:
            return
        queue.enqueue_dependents(job)

    def _complete_without_keeping(self, slot: Slot) -> None:
        """A job with result_ttl 0: RQ deletes it on success (``job.cleanup(0)``); its results
        still reach its run's stream, which is where queuebert's readers look."""
        try:
            job = QueuebertJob.fetch(slot.job.id, connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError:
            job = None
        if job is not None:
            slot.queue.enqueue_dependents(job)
        with self.connection.pipeline(transaction=False) as pipe:
            self.store.delete_executions([slot.job], pipe)
            if slot.request is not None and slot.request.run:
                record_job(self.connection, pipe, slot.request.run, slot.job.id, slot.results,  # type: ignore[arg-type]
                           DEFAULT_RESULT_TTL)
            if job is not None:
                job.cleanup(0, pipeline=pipe, remove_from_queue=False)
            pipe.hincrby(self.worker.key, "qb_items", len(slot.results))
            pipe.hincrby(self.worker.key, "successful_job_count", 1)
            pipe.execute()

    def _fail(self, slot: Slot) -> None:
        """A job that cannot run at all fails in RQ with the reason; retrying would not help."""
        execution = slot.job.execution(self.connection, self.worker.name)
        try:
            job = QueuebertJob.fetch(slot.job.id, connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError:  # deleted while it ran: nothing left to fail but its execution
            with self.connection.pipeline(transaction=False) as pipe:
                self.store.delete_executions([slot.job], pipe)
                pipe.execute()
            return
        job.retries_left = 0
        job.ended_at = now()
        log.warning("job failed", job=job.id, error=slot.error)
        self.worker.handle_job_failure(job, slot.queue, exc_string=slot.error or "", execution=execution)
        try:
            kwargs = slot.job.decode()[2]
        except Exception:
            return
        run, results = job_error_results(kwargs, slot.error or "job failed", slot.error_kind)
        if run:
            with self.connection.pipeline(transaction=False) as pipe:
                record_job(self.connection, pipe, run, job.id, results, DEFAULT_RESULT_TTL)
                pipe.execute()
