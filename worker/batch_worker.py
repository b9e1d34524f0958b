"""The batching worker: an RQ worker that pools many jobs' items into micro-batches in-process.

Three threads, so the device never waits on Redis:
- taker: takes many jobs per round trip and registers them as started the way RQ does, atomically
  in one script (:class:`~worker.job_store.JobStore`), validates items, tokenizes them and adds
  them to the length-sorted item pool
  (:class:`~worker.scheduler.BatchScheduler`) while compute runs;
- compute (the main thread): cuts each token-bounded batch from the pool around its oldest item,
  runs it, and hands every job whose items are all done to the completer;
- completer: writes RQ results, registries, run-stream entries for all finished jobs in one script.
A heartbeat thread keeps executions alive and runs RQ's registry maintenance, which is also what
recovers the jobs of a worker that was killed.

A Redis error in any thread is weather (:mod:`worker.outage`): the thread backs off and retries, and
while completing fails the taker takes nothing new, so what the worker holds stays bounded by its
pool. Any other exception in a thread is a bug: the worker stops (jobs it held are given back, or
recovered by RQ once their executions expire) and the process exits non-zero, so a supervisor
restarts it; it never goes on half-alive.
"""

from __future__ import annotations

import itertools
import math
import os
import queue as queue_mod
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog
from rq import Queue, worker_registration
from rq.exceptions import DeserializationError
from rq.job import Job
from rq.registry import StartedJobRegistry, clean_registries
from rq.timeouts import TimerDeathPenalty
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from queuebert import keys
from queuebert.job import QueuebertJob
from queuebert.schema import DEADLINE_EXCEEDED, INVALID_JOB, Item, ItemResult, JobError, JobRequest, is_error, parse_job
from queuebert.serializer import JSONSerializer
from queuebert.settings import WorkerSettings

from . import rq_completion
from .engine import BatchStats, Engine
from .job_store import JobStore, TakenJob
from .metrics import WorkerMetrics
from .outage import Outage
from .scheduler import BatchScheduler, Entry
from .tasks import deadline_message, split_items

log = structlog.get_logger(__name__)

_END = object()


@dataclass
class Slot:
    """One taken job: where its items sit in the pool and what comes back."""

    job: TakenJob
    queue: Queue
    request: JobRequest | None = None
    priority: int = 0  # index of its queue: 0 is the most urgent
    results: list[ItemResult | None] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # where each valid item's result goes
    remaining: int = 0  # valid items not computed yet
    computing: bool = False  # some item is in (or past) a forward batch
    error: str | None = None
    error_kind: str = INVALID_JOB
    written: bool = False  # its completion (or failure) is in Redis; what is left is releasing dependents


class _StatsWindow:
    """Batch figures summed over about a second, for one log line (a line per batch would be
    a dozen a second)."""

    def __init__(self, every: float = 1.0):
        self.every = every
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
        s = self.stats
        out = {"jobs": self.jobs, "texts": s.texts, "batches": s.batches, "padded_tokens": s.padded_tokens,
               "padding_ratio": round(s.padding_ratio, 3), "forward_ms": round(1000 * s.forward_seconds, 1),
               "queue_wait_ms": round(1000 * self.max_wait, 1)}
        self.__init__(self.every)  # type: ignore[misc]
        return out


class BatchWorker(SimpleWorker):
    """RQ worker that runs queuebert jobs in-process, micro-batched across jobs.

    Start it with ``queuebert worker ...`` or ``rq worker -w worker.BatchWorker`` (settings from
    ``QUEUEBERT_*`` variables). It always uses JSON: a pickled job is refused, never executed.
    """

    #: Texts per tokenizer call in the taker: large enough to amortise the call, small enough that
    #: a burst reaches the pool in steps of a few milliseconds.
    TOKENIZE_CHUNK = 256

    def __init__(self, queues: Any, *args: Any, settings: WorkerSettings | None = None,
                 engine: Engine | None = None, **kwargs: Any):
        self.settings = settings or WorkerSettings.from_env()
        kwargs["serializer"] = JSONSerializer
        # `rq worker -w` passes rq.job.Job; ours refuses callbacks and webhooks a job hash names
        # (see queuebert.job), including in the abandoned-job recovery every worker runs.
        kwargs["job_class"] = QueuebertJob
        kwargs.setdefault("maintenance_interval", self.settings.heartbeat_interval)
        if self.settings.name and not kwargs.get("name") and not (args and args[0]):
            kwargs["name"] = self.settings.name
        super().__init__(queues, *args, **kwargs)
        # Queues built by `rq worker` carry its serializer (pickle by default); ours are JSON.
        self.queues = [Queue(q.name, connection=self.connection, serializer=JSONSerializer, job_class=QueuebertJob)
                       for q in self.queues]
        self._ordered_queues = self.queues[:]
        self.engine = engine
        self._stop = threading.Event()
        self._signals = 0  # counted: a burst ending sets _stop too, which is not a first signal
        self.scheduler: BatchScheduler | None = None
        self._taker_done = threading.Event()
        self._done: queue_mod.Queue[Any] = queue_mod.Queue()
        #: Held jobs by ``<job id>:<execution id>``: the same job can be held twice (RQ requeued it
        #: after its execution expired while Redis refused heartbeats, and this worker took it again).
        self._inflight: dict[str, Slot] = {}
        self._lock = threading.Lock()
        self.completed_jobs = 0
        self.completed_items = 0
        self.metrics: WorkerMetrics | None = None
        self._store: JobStore | None = None
        #: Set when a thread died of a bug: the worker stops and the process exits non-zero.
        self.fatal: BaseException | None = None
        #: Set when shutdown can wait no longer for the completer (Redis refusing writes).
        self._abandon = threading.Event()
        self.outages = {name: Outage(name, on_change=self._on_outage)
                        for name in ("take", "complete", "heartbeat", "maintenance")}

    # -- RQ hooks ---------------------------------------------------------------------------

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Short execution TTLs, kept alive by the heartbeat thread: a killed worker's jobs expire
        from the started registry within about 3 heartbeat intervals and are then retried."""
        return max(3 * self.settings.heartbeat_interval, 3)

    def request_stop(self, signum: int, frame: Any) -> None:
        """Warm stop (SIGTERM, SIGINT, `rq shutdown`): finish the batch in progress, give back
        jobs not started; a second signal exits at once (taken jobs are then recovered by RQ)."""
        self._signals += 1
        if self._signals > 1:
            log.warning("second stop signal, exiting now", worker=self.name)
            os._exit(1)
        log.info("stopping after the batch in progress", worker=self.name, signal=signum)
        self._shutdown_requested_date = now()
        self._stop.set()

    def _install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGTERM, self.request_stop)

    # -- main loop --------------------------------------------------------------------------

    def load_engine(self) -> Engine:
        if self.engine is None:
            from .tasks import get_engine

            self.engine = get_engine(self.settings)
        return self.engine

    def work(self, burst: bool = False, logging_level: str | None = None, *args: Any, **kwargs: Any) -> bool:
        """Load the model, then take, batch, run and complete jobs until stopped (or, in burst
        mode, until the queues are empty)."""
        burst = burst or self.settings.burst
        engine = self.load_engine()
        self.scheduler = BatchScheduler(engine.max_batch_size, engine.max_batch_tokens)
        self.metrics = WorkerMetrics(model=engine.m.name, device=str(engine.m.device))
        self.metrics.load.labels(**self.metrics.labels).set(engine.m.load_seconds)
        if self.settings.metrics_port:
            self.metrics.serve(self.settings.metrics_port)
            log.info("serving metrics", port=self.settings.metrics_port)
        self._install_signal_handlers()
        if not self._register(logging_level or "WARNING"):
            self._teardown()
            return False
        self._store = JobStore.for_worker(self, self._ordered_queues)
        threads = [
            threading.Thread(target=self._guarded, args=(self._take_loop, burst), name="qb-take", daemon=True),
            threading.Thread(target=self._guarded, args=(self._complete_loop,), name="qb-complete", daemon=True),
            threading.Thread(target=self._guarded, args=(self._heartbeat_loop,), name="qb-heartbeat", daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            self._guarded(self._compute_loop)
        finally:
            self._stop.set()
            self.scheduler.close()
            threads[0].join(timeout=30)
            self._return_unstarted()
            self._done.put(_END)
            threads[1].join(timeout=60)
            if threads[1].is_alive():  # still retrying a Redis that refuses writes: stop waiting
                self._abandon.set()
                threads[1].join(timeout=10)
            self._give_back_held()
            self._teardown()
            log.info("worker stopped", worker=self.name, jobs=self.completed_jobs, items=self.completed_items,
                     **({"fatal": repr(self.fatal)} if self.fatal is not None else {}))
        return self.completed_jobs > 0

    def _register(self, logging_level: str) -> bool:
        """RQ's ``bootstrap`` (register the worker, subscribe to its commands), then queuebert's
        fields, each step retried while Redis refuses it: a worker started against a full or
        read-only Redis waits for it instead of dying. False if stopped meanwhile."""
        from rq.logutils import setup_loghandlers

        engine = self.engine
        assert engine is not None
        setup_loghandlers(logging_level, name="rq.worker")
        setup_loghandlers(logging_level, name="rq.job")
        steps = [
            self.register_birth,
            self.subscribe,
            # Beside RQ's fields, so `queuebert stats` can say what each worker serves.
            lambda: self.connection.hset(self.key, mapping={
                "qb_model": engine.m.name, "qb_device": str(engine.m.device),
                "qb_dtype": str(engine.m.dtype).removeprefix("torch.")}),
            lambda: self.set_state(WorkerStatus.IDLE),
        ]
        outage = self.outages["heartbeat"]
        for step in steps:
            while True:
                try:
                    step()
                    break
                except redis.RedisError as exc:
                    if self._stop.wait(outage.failed(exc)):
                        return False
        outage.recovered()
        log.info("worker started", worker=self.name, queues=self.queue_names())
        return True

    def _guarded(self, target: Any, *args: Any) -> None:
        """Run a thread's loop; an exception that is not Redis weather (each loop rides those out
        itself) is a bug: stop the worker rather than leave it running without this thread."""
        try:
            target(*args)
        except Exception as exc:
            if self.fatal is None:
                self.fatal = exc
            log.exception("worker thread died: stopping the worker", thread=threading.current_thread().name,
                          error=repr(exc))
            self._stop.set()
            if self.scheduler is not None:
                self.scheduler.close()

    def _teardown(self) -> None:
        """RQ's ``register_death``, tolerating a Redis that refuses writes: the worker key then
        expires by itself and its jobs are recovered from the started registry."""
        try:
            self.teardown()
        except redis.RedisError as exc:
            log.warning("could not deregister the worker; its key expires by itself", error=str(exc))

    def _on_outage(self, outage: Outage) -> None:
        if self.metrics is not None:
            self.metrics.redis_down.labels(**self.metrics.labels, component=outage.component).set(
                1 if outage.down else 0)

    def _compute_loop(self) -> None:
        """Run batches from the pool until stopped (or the taker ended a burst); every job whose
        items are all done goes to the completer right after its last batch."""
        engine, scheduler = self.engine, self.scheduler
        assert engine is not None and scheduler is not None
        max_wait = self.settings.max_wait_ms / 1000
        window = _StatsWindow()
        while not self._stop.is_set():
            batch = scheduler.next_batch(max_wait)
            if batch is None:
                if self._taker_done.is_set():
                    break
                continue
            stats = BatchStats()
            results = engine.run_batch([e.item for e in batch], [e.top_k for e in batch], [e.ids for e in batch], stats)
            finished: list[Slot] = []
            waits: list[float] = []
            wall = time.time()
            with self._lock:  # the taker may be settling other items of these jobs (tokenizer errors)
                for e, result in zip(batch, results):
                    slot: Slot = e.owner
                    if not slot.computing:
                        slot.computing = True
                        if slot.job.enqueued_at:
                            waits.append(wall - slot.job.enqueued_at)
                    slot.results[slot.positions[e.index]] = result
                    slot.remaining -= 1
                    if slot.remaining == 0:
                        finished.append(slot)
            if finished:
                self._done.put(finished)
            if self.metrics is not None:
                self.metrics.observe_batches(stats.per_batch, waits)
            window.add(stats, len(finished), waits)
            if window.due():
                log.info("batch", pool=len(scheduler), **window.flush())
        if window.stats.batches:
            log.info("batch", pool=len(scheduler), **window.flush())

    # -- taking -----------------------------------------------------------------------------

    def _take(self, want: int, block: float) -> list[Slot]:
        """Up to ``want`` jobs, registered as started; with none queued, wait up to ``block``
        seconds on the most urgent queue (only one list can be waited on: with several queues the
        caller blocks briefly and comes back to look at the others)."""
        store = self._store
        assert store is not None
        ttl = self.get_heartbeat_ttl(None)  # type: ignore[arg-type]
        taken, gone = store.take(want, ttl)
        if not taken and not gone and block:
            first = self._ordered_queues[0]
            # Into RQ's intermediate list, so a worker killed right here leaves the job where
            # RQ's maintenance finds it; the take script moves it on from there.
            job_id = self.connection.blmove(first.key, first.intermediate_queue_key, block, "LEFT", "RIGHT")
            if job_id is None:
                return []
            taken, gone = store.take(want, ttl, first=(0, job_id.decode()))
        slots = [Slot(job=tj, queue=self._ordered_queues[tj.queue_index], priority=tj.queue_index) for tj in taken]
        with self._lock:
            for sl in slots:
                self._inflight[sl.job.composite_key] = sl
        return slots

    def _prepare(self, slots: list[Slot]) -> None:
        """Decode and check each job, tokenize all their items in one call, add them to the pool.
        A job that cannot run, or whose items all failed before the forward, completes at once."""
        engine, scheduler = self.engine, self.scheduler
        assert engine is not None and scheduler is not None
        s = self.settings
        new_items: list[Item] = []
        new_top_k: list[int | None] = []
        owners: list[tuple[Slot, int]] = []
        ready: list[Slot] = []
        for slot in slots:
            try:
                func_name, args, kwargs = slot.job.decode()
                if func_name != keys.JOB_FUNC:
                    raise JobError(f"BatchWorker runs only {keys.JOB_FUNC}, not {func_name}")
                slot.request = parse_job(args, kwargs, s.max_items_per_job)
                if slot.request.deadline is not None and time.time() > slot.request.deadline:
                    slot.error, slot.error_kind = deadline_message(slot.request.deadline), DEADLINE_EXCEEDED
            except DeserializationError:
                slot.error = "job payload is not JSON (a pickled job?); refused without executing it"
            except JobError as exc:
                slot.error = str(exc)
            except Exception as exc:
                slot.error = f"unreadable job: {type(exc).__name__}: {exc}"
            if slot.error is not None:
                ready.append(slot)
                continue
            valid, positions, results = split_items(slot.request, s.max_text_chars)
            slot.results, slot.positions, slot.remaining = results, positions, len(valid)
            new_items.extend(valid)
            new_top_k.extend([slot.request.top_k] * len(valid))
            owners.extend(zip(itertools.repeat(slot, len(valid)), range(len(valid))))
            if not valid:
                ready.append(slot)
        if ready:
            self._done.put(ready)
        # Tokenize and add in chunks, so a burst fills the pool progressively and compute can
        # start on a few hundred texts instead of waiting for all of them (or starting on a few).
        assert self._store is not None
        scheduler.expect(len(new_items), queued=self._store.left > 0)
        for start in range(0, len(new_items), self.TOKENIZE_CHUNK):
            end = min(start + self.TOKENIZE_CHUNK, len(new_items))
            enc, errors = engine.encode(new_items[start:end], new_top_k[start:end])
            failed = dict(errors)
            done: list[Slot] = []
            entries = [Entry(owners[i][0], owners[i][1], new_items[i], new_top_k[i], enc.ids[i - start],
                             owners[i][0].priority) for i in range(start, end) if i - start not in failed]
            if failed:
                # The tokenizer refused these texts: the error is their result. Compute may be
                # finishing other items of the same jobs right now, hence the lock.
                with self._lock:
                    for i, err in failed.items():
                        slot, n = owners[start + i]
                        slot.results[slot.positions[n]] = err
                        slot.remaining -= 1
                        if slot.remaining == 0:
                            done.append(slot)
            if done:
                self._done.put(done)
            scheduler.add(entries, settled=end - start)

    def _take_loop(self, burst: bool) -> None:
        """Keep the pool filled up to ``max_pool_items`` while compute runs. With nothing queued,
        block on the queue (Redis wakes us when a job arrives); with the pool full, back off so the
        poll does not steal the cores the forward needs."""
        s = self.settings
        scheduler = self.scheduler
        assert scheduler is not None
        pause = 0.0005
        items_per_job = 1.0  # running estimate, to ask for about as many jobs as the pool has room for
        sized = False
        try:
            while not self._stop.is_set():
                room = s.max_pool_items - len(scheduler)
                if room <= 0:
                    time.sleep(pause)
                    pause = min(pause * 2, 0.02)
                    continue
                # Until the first jobs show how many items a job holds, take one: 256 jobs of
                # 64 texts would overshoot the pool sixteenfold.
                want = max(1, min(s.take_jobs, math.ceil(room / items_per_job))) if sized else 1
                block = 0.0 if burst else (1.0 if len(self.queues) == 1 else 0.05)
                if self.outages["complete"].down:
                    # Results cannot be written: taking more would only pile up work that cannot
                    # finish. What the worker holds stays bounded by its pool.
                    self._stop.wait(0.1)
                    continue
                # Looked at before the take: a job still held may be queued again as it completes
                # (a retry, a repeat, a released dependent), so a burst ends only after a take that
                # began with nothing held found nothing.
                held = self._busy()
                try:
                    slots = self._take(want, block)
                    self.outages["take"].recovered()
                except redis.RedisError as exc:
                    self._stop.wait(self.outages["take"].failed(exc))
                    continue
                if not slots:
                    scheduler.expect(0, queued=False)  # nothing queued (another worker may have taken it)
                    if burst and not held:
                        return
                    time.sleep(pause if burst or len(self.queues) > 1 else 0)
                    pause = min(pause * 2, 0.02)
                    continue
                pause = 0.0005
                self._prepare(slots)
                taken = sum(len(sl.positions) for sl in slots) / len(slots)
                if taken:
                    items_per_job = taken if not sized else max(1.0, 0.8 * items_per_job + 0.2 * taken)
                    sized = True
        finally:
            self._taker_done.set()
            if self._stop.is_set():
                scheduler.close()

    def _busy(self) -> bool:
        with self._lock:
            return bool(self._inflight)

    # -- completing -------------------------------------------------------------------------

    def _complete_loop(self) -> None:
        while True:
            slots = self._done.get()
            if slots is _END:
                return
            slots = self._gather(slots)  # one script call for all that finished meanwhile
            outage = self.outages["complete"]
            while True:
                try:
                    self._complete(slots)
                    outage.recovered()
                    break
                except redis.RedisError as exc:
                    # Results are keyed by job, the run record is once per job, and each slot
                    # remembers what is already written: retrying is safe. The results stay here
                    # (the taker takes nothing new meanwhile) until Redis accepts them.
                    delay = outage.failed(exc)
                    if self._abandon.wait(delay):
                        log.warning("stopping with jobs not completed: RQ recovers them when their "
                                    "executions expire", jobs=len([s for s in slots if not s.written]))
                        return
                    slots = self._gather(slots)

    def _gather(self, slots: list[Slot]) -> list[Slot]:
        """``slots`` and whatever else finished since, without waiting (the end marker stays queued)."""
        while True:
            try:
                more = self._done.get_nowait()
            except queue_mod.Empty:
                return slots
            if more is _END:
                self._done.put(_END)
                return slots
            slots = slots + more

    def _complete(self, slots: list[Slot]) -> None:
        """Write every slot's outcome; on a Redis error the caller retries with the same slots, and
        those already written (``slot.written``) are not written again."""
        store = self._store
        assert store is not None
        todo = [s for s in slots if not s.written]
        ok = [s for s in todo if s.error is None]
        failed = [s for s in todo if s.error is not None]
        item_errors = items = 0
        for slot in ok:
            item_errors += sum(1 for r in slot.results if is_error(r))  # type: ignore[arg-type]
            items += len(slot.results)
        rq_completion.complete(self, store, ok)
        for slot in failed:
            rq_completion.fail(self, store, slot, slot.error or "job failed", slot.error_kind)
            slot.written = True
        with self._lock:
            for slot in slots:
                self._inflight.pop(slot.job.composite_key, None)
            idle = not self._inflight
        if idle:
            try:
                self.set_state(WorkerStatus.IDLE)
            except redis.RedisError:
                pass  # cosmetic (`rq info`); the next take or heartbeat sets it again
        self.completed_jobs += len(ok)
        self.completed_items += items
        if self.metrics is not None:
            self.metrics.count(items - item_errors, item_errors, len(ok), len(failed))

    def _return_unstarted(self) -> None:
        """At a stop, jobs with items still in the pool go back to the front of their queue, as if
        never taken (results of a partly computed job are dropped: whoever takes it next computes
        them all)."""
        assert self.scheduler is not None
        owners = {id(e.owner): e.owner for e in self.scheduler.drain()}
        self._give_back([o for o in owners.values() if o.error is None and o.remaining > 0], "not started")

    def _give_back_held(self) -> None:
        """After the completer is done: whatever the worker still holds (a completion Redis kept
        refusing, jobs a dying thread left behind) goes back to its queue."""
        with self._lock:
            held = [s for s in self._inflight.values() if not s.written]
        self._give_back(held, "not completed")

    def _give_back(self, slots: list[Slot], what: str) -> None:
        if not slots:
            return
        assert self._store is not None
        try:
            given = self._store.give_back([slot.job for slot in slots])
        except redis.RedisError as exc:
            # Left in the started registry: RQ's maintenance (any worker's) requeues them once
            # their executions expire, within about three heartbeat intervals.
            log.warning(f"could not give back jobs {what}; they are recovered when their executions expire",
                        jobs=len(slots), error=str(exc))
            return
        with self._lock:
            for slot in slots:
                self._inflight.pop(slot.job.composite_key, None)
        log.info(f"gave back jobs {what}", jobs=given, **({"no_longer_held": len(slots) - given}
                                                          if given < len(slots) else {}))

    # -- liveness -----------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        """Each interval: extend the executions of held jobs (first: it is what keeps them from
        being recovered under us), the worker's own heartbeat, then maintenance. Each step rides
        out Redis errors on its own; a failing step never skips the ones after it."""
        interval = self.settings.heartbeat_interval
        beat, upkeep = self.outages["heartbeat"], self.outages["maintenance"]
        while not self._stop.wait(interval):
            ttl = self.get_heartbeat_ttl(None)  # type: ignore[arg-type]
            with self._lock:
                jobs = [slot.job for slot in self._inflight.values()]
            try:
                assert self._store is not None
                self._store.heartbeat(jobs, ttl)
                self._publish_redis_state()
                self.heartbeat(ttl + 60)
                beat.recovered()
            except redis.RedisError as exc:
                beat.failed(exc)
            try:
                self.recover_abandoned()
                if self.should_run_maintenance_tasks:
                    self.clean_registries()
                upkeep.recovered()
            except Exception as exc:  # RQ's maintenance on odd data must not stop the heartbeats
                upkeep.failed(exc)

    def _publish_redis_state(self) -> None:
        """``qb_redis`` in the worker hash: ``ok``, or what Redis refuses and since when, for
        ``queuebert stats`` (written even at maxmemory; a read-only Redis takes no write at all, and
        stats reads its role from INFO instead)."""
        assert self._store is not None
        problems = [d for d in (o.describe() for o in self.outages.values()) if d]
        self._store.publish_state("; ".join(problems) if problems else "ok")

    def recover_abandoned(self) -> None:
        """Requeue (or fail, once out of retries) jobs whose worker stopped heartbeating.

        RQ does this inside `clean_registries`, under a 15-minute lock that a worker killed
        mid-maintenance leaves behind; recovery must not wait on that, so the started registries
        are swept here every heartbeat, under a lock that expires with the heartbeat.
        """
        for q in self.queues:
            lock = keys.recovery_lock(q.name)
            if self.connection.set(lock, self.name, nx=True, ex=max(self.settings.heartbeat_interval, 1)):
                registry = self._started_registry(q)
                expired = registry.get_expired_job_ids()
                if expired:
                    log.warning("recovering abandoned jobs", queue=q.name, jobs=len(expired))
                    registry.cleanup(exception_handlers=self._exc_handlers)

    def _started_registry(self, q: Queue) -> StartedJobRegistry:
        # Failure callbacks run under a death penalty; the signal-based default only works in the
        # main thread, and maintenance runs in the heartbeat thread.
        return StartedJobRegistry(queue=q, job_class=self.job_class, serializer=JSONSerializer,
                                  death_penalty_class=TimerDeathPenalty)

    def clean_registries(self) -> None:
        """RQ's maintenance, from the heartbeat thread, with the lock released even on error."""
        for q in self.queues:
            if not q.acquire_maintenance_lock():
                continue
            try:
                self._started_registry(q).cleanup(exception_handlers=self._exc_handlers)
                clean_registries(q, self._exc_handlers)
                worker_registration.clean_worker_registry(q)
                q.intermediate_queue.cleanup(self, q)
            finally:
                q.release_maintenance_lock()
        self.clean_group_registries()
        self.last_cleaned_at = now()
