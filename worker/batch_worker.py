"""The batching worker: an RQ worker that pools many jobs' items into micro-batches in-process.

Three threads, so the device never waits on Redis:
- taker: takes many jobs per round trip (LMOVE into RQ's intermediate queue, so a crash between
  take and start leaves them where RQ's maintenance finds them), registers their executions in
  one pipeline, validates items and tokenizes them, and hands pools to the compute loop;
- compute (the main thread): sorts a pool by length, cuts token-bounded batches, runs them;
- completer: writes RQ results, registries, run-stream entries for all finished jobs in one pipeline.
A heartbeat thread keeps executions alive and runs RQ's registry maintenance, which is also what
recovers the jobs of a worker that was killed.
"""

from __future__ import annotations

import math
import os
import queue as queue_mod
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog
from rq import Queue, worker_registration
from rq.exceptions import DeserializationError
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry, clean_registries
from rq.results import Result
from rq.timeouts import TimerDeathPenalty
from rq.utils import now, utcformat
from rq.worker import SimpleWorker, WorkerStatus

from producer import keys
from producer.results import encode_results, record_job, rq_success_fields
from producer.schema import DEADLINE_EXCEEDED, INVALID_JOB, Item, ItemResult, JobError, JobRequest, parse_job
from producer.serializer import JSONSerializer
from producer.settings import DEFAULT_RESULT_TTL, WorkerSettings

from .engine import BatchStats, Encoded, Engine
from .metrics import WorkerMetrics
from .tasks import deadline_message, job_error_results, split_items

log = structlog.get_logger(__name__)

# Move up to ARGV[1] job ids from the first non-empty queues (priority order) into their
# intermediate lists, atomically. KEYS: queue1, intermediate1, queue2, intermediate2, ...
TAKE_LUA = """
local out = {}
local want = tonumber(ARGV[1])
for q = 1, #KEYS, 2 do
  while #out / 2 < want do
    local id = redis.call('LMOVE', KEYS[q], KEYS[q + 1], 'LEFT', 'RIGHT')
    if not id then break end
    out[#out + 1] = (q + 1) / 2
    out[#out + 1] = id
  end
end
return out
"""

_END = object()


@dataclass
class Slot:
    """One taken job: where its items sit in the pool and what comes back."""

    job: Job
    queue: Queue
    execution: Execution
    request: JobRequest | None
    results: list[ItemResult | None] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    offset: int = 0  # index of this job's first valid item in the pool
    error: str | None = None
    error_kind: str = INVALID_JOB


@dataclass
class Pool:
    slots: list[Slot] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    top_k: list[int | None] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    token_errors: list[tuple[int, ItemResult]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


class BatchWorker(SimpleWorker):
    """RQ worker that runs queuebert jobs in-process, micro-batched across jobs.

    Start it with ``queuebert worker ...`` or ``rq worker -w worker.BatchWorker`` (settings from
    ``QUEUEBERT_*`` variables). It always uses JSON: a pickled job is refused, never executed.
    """

    def __init__(self, queues: Any, *args: Any, settings: WorkerSettings | None = None,
                 engine: Engine | None = None, **kwargs: Any):
        self.settings = settings or WorkerSettings.from_env()
        kwargs["serializer"] = JSONSerializer
        kwargs.setdefault("maintenance_interval", self.settings.heartbeat_interval)
        if self.settings.name and not kwargs.get("name") and not (args and args[0]):
            kwargs["name"] = self.settings.name
        super().__init__(queues, *args, **kwargs)
        # Queues built by `rq worker` carry its serializer (pickle by default); ours are JSON.
        self.queues = [Queue(q.name, connection=self.connection, serializer=JSONSerializer) for q in self.queues]
        self._ordered_queues = self.queues[:]
        self.engine = engine
        self._stop = threading.Event()
        self._signals = 0  # counted: a burst ending sets _stop too, which is not a first signal
        self._pools: queue_mod.Queue[Any] = queue_mod.Queue(maxsize=1)
        self._compute_waiting = threading.Event()  # set while compute waits for a pool
        self._done: queue_mod.Queue[Any] = queue_mod.Queue()
        self._inflight: dict[str, Slot] = {}
        self._lock = threading.Lock()
        self._take_script = self.connection.register_script(TAKE_LUA)
        self.completed_jobs = 0
        self.completed_items = 0
        self.metrics: WorkerMetrics | None = None
        self._leftover: list[Slot] = []
        self._registry_cache: dict[str, tuple[StartedJobRegistry, FinishedJobRegistry]] = {}

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
        self.metrics = WorkerMetrics(model=engine.m.name, device=str(engine.m.device))
        self.metrics.load.labels(**self.metrics.labels).set(engine.m.load_seconds)
        if self.settings.metrics_port:
            self.metrics.serve(self.settings.metrics_port)
            log.info("serving metrics", port=self.settings.metrics_port)
        self.bootstrap(logging_level or "WARNING")
        # Beside RQ's fields, so `queuebert stats` can say what each worker serves.
        self.connection.hset(self.key, mapping={"qb_model": engine.m.name, "qb_device": str(engine.m.device),
                                                "qb_dtype": str(engine.m.dtype).removeprefix("torch.")})
        self._install_signal_handlers()
        self.set_state(WorkerStatus.IDLE)
        threads = [
            threading.Thread(target=self._take_loop, args=(burst,), name="qb-take", daemon=True),
            threading.Thread(target=self._complete_loop, name="qb-complete", daemon=True),
            threading.Thread(target=self._heartbeat_loop, name="qb-heartbeat", daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            self._compute_loop()
        finally:
            self._stop.set()
            threads[0].join(timeout=30)
            self._give_back_unstarted()
            self._done.put(_END)
            threads[1].join(timeout=60)
            self.teardown()
            log.info("worker stopped", worker=self.name, jobs=self.completed_jobs, items=self.completed_items)
        return self.completed_jobs > 0

    def _compute_loop(self) -> None:
        engine = self.engine
        assert engine is not None
        while True:
            self._compute_waiting.set()
            try:
                pool = self._pools.get(timeout=0.5)
            except queue_mod.Empty:
                continue
            self._compute_waiting.clear()
            if pool is _END:
                return
            if self._stop.is_set():
                self._leftover.extend(pool.slots)  # taken but not started: give back
                continue
            self._run_pool(engine, pool)

    def _run_pool(self, engine: Engine, pool: Pool) -> None:
        bad = {i for i, _ in pool.token_errors}
        order = sorted((i for i in range(len(pool.items)) if i not in bad), key=lambda i: len(pool.ids[i]))
        stats = BatchStats()
        results = engine.run(Encoded(pool.items, pool.top_k, pool.ids, order), stats) if pool.items else []
        for i, err in pool.token_errors:
            results[i] = err
        for slot in pool.slots:
            for n, pos in enumerate(slot.positions):
                slot.results[pos] = results[slot.offset + n]
        waits = [time.time() - s.job.enqueued_at.timestamp() for s in pool.slots if s.job.enqueued_at]
        if self.metrics is not None:
            self.metrics.observe_batches(stats.per_batch, waits)
        log.info(
            "batch", jobs=len(pool.slots), texts=stats.texts, batches=stats.batches,
            padded_tokens=stats.padded_tokens, padding_ratio=round(stats.padding_ratio, 3),
            queue_wait_ms=round(1000 * max(waits), 1) if waits else None,
            forward_ms=round(1000 * stats.forward_seconds, 1),
        )
        self._done.put(pool.slots)

    # -- taking -----------------------------------------------------------------------------

    def _take_ids(self, want: int, block: float) -> list[tuple[Queue, str]]:
        queue_keys: list[str] = []
        for q in self._ordered_queues:
            queue_keys += [q.key, q.intermediate_queue_key]
        flat = self._take_script(keys=queue_keys, args=[want])
        taken = [(self._ordered_queues[int(flat[i]) - 1], flat[i + 1].decode()) for i in range(0, len(flat), 2)]
        if taken or not block:
            return taken
        first = self._ordered_queues[0]
        # Only one source list can be waited on; with several queues wait briefly on the most
        # urgent and rescan the others, so lower priorities wait at most `block` seconds.
        job_id = self.connection.blmove(first.key, first.intermediate_queue_key, block, "LEFT", "RIGHT")
        if job_id is None:
            return []
        return [(first, job_id.decode())] + self._take_ids(want - 1, 0)

    def _take(self, want: int, block: float) -> list[Slot]:
        taken = self._take_ids(want, block)
        if not taken:
            return []
        jobs = Job.fetch_many([j for _, j in taken], connection=self.connection, serializer=JSONSerializer)
        slots: list[Slot] = []
        ttl = self.get_heartbeat_ttl(None)  # type: ignore[arg-type]
        with self.connection.pipeline(transaction=False) as pipe:
            for (q, job_id), job in zip(taken, jobs):
                if job is None:  # expired (job TTL passed) or deleted while queued
                    pipe.lrem(q.intermediate_queue_key, 1, job_id)
                    log.info("job gone before it started, dropped", job=job_id, queue=q.name)
                    continue
                execution = self._register_execution(job, q, ttl, pipe)
                job.prepare_for_execution(self.name, pipeline=pipe)
                if job.ttl:  # a queued job's hash may expire; a started one must not
                    pipe.persist(job.key)
                pipe.lrem(q.intermediate_queue_key, 1, job_id)
                slots.append(Slot(job=job, queue=q, execution=execution, request=None))
            if slots:
                pipe.expire(self.executions_key, ttl + 60)
            self.heartbeat(pipeline=pipe)
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            pipe.execute()
        with self._lock:
            for s in slots:
                self._inflight[s.job.id] = s
        return slots

    def _registries(self, q: Queue) -> tuple[StartedJobRegistry, FinishedJobRegistry]:
        """One registry object per queue: building one per job (as `job.started_job_registry`
        does) costs more than the Redis commands it issues."""
        cached = self._registry_cache.get(q.name)
        if cached is None:
            cached = self._registry_cache[q.name] = (
                self._started_registry(q),
                FinishedJobRegistry(queue=q, job_class=self.job_class, serializer=JSONSerializer),
            )
        return cached

    def _register_execution(self, job: Job, q: Queue, ttl: int, pipe: Any) -> Execution:
        """What `Execution.create` writes (execution hash, the job's execution registry, the
        started registry, this worker's execution set), with the per-queue registry reused."""
        execution = Execution(id=uuid.uuid4().hex, job_id=job.id, connection=self.connection, worker_name=self.name)
        execution._job = job
        execution.save(ttl=ttl, pipeline=pipe)
        ExecutionRegistry(job_id=job.id, connection=pipe).add(execution=execution, ttl=ttl, pipeline=pipe)
        self._registries(q)[0].add_execution(execution, pipeline=pipe, ttl=ttl, xx=False)
        pipe.sadd(self.executions_key, execution.composite_key)
        self.executions[execution.id] = execution
        return execution

    def _delete_execution(self, slot: Slot, pipe: Any) -> None:
        """What `Execution.delete` does, with the per-queue registry reused."""
        execution = slot.execution
        pipe.delete(execution.key)
        self._registries(slot.queue)[0].remove_execution(execution, pipeline=pipe)
        ExecutionRegistry(job_id=execution.job_id, connection=self.connection).remove(execution, pipeline=pipe)
        pipe.srem(self.executions_key, execution.composite_key)

    def _prepare(self, pool: Pool, slots: list[Slot]) -> None:
        """Decode and check each job, then tokenize all new items in one call."""
        engine = self.engine
        assert engine is not None
        s = self.settings
        new_items: list[Item] = []
        new_top_k: list[int | None] = []
        base = len(pool.items)
        for slot in slots:
            try:
                if slot.job.func_name != keys.JOB_FUNC:
                    raise JobError(f"BatchWorker runs only {keys.JOB_FUNC}, not {slot.job.func_name}")
                slot.request = parse_job(slot.job.args, slot.job.kwargs, s.max_items_per_job)
                if slot.request.deadline is not None and time.time() > slot.request.deadline:
                    slot.error, slot.error_kind = deadline_message(slot.request.deadline), DEADLINE_EXCEEDED
            except DeserializationError:
                slot.error = "job payload is not JSON (a pickled job?); refused without executing it"
            except JobError as exc:
                slot.error = str(exc)
            except Exception as exc:
                slot.error = f"unreadable job: {type(exc).__name__}: {exc}"
            if slot.error is not None:
                self._done.put([slot])
                continue
            valid, positions, results = split_items(slot.request, s.max_text_chars)
            slot.results, slot.positions = results, positions
            slot.offset = base + len(new_items)
            new_items.extend(valid)
            new_top_k.extend([slot.request.top_k] * len(valid))
            pool.slots.append(slot)
        if new_items:
            enc, errors = engine.encode(new_items, new_top_k)
            pool.items.extend(new_items)
            pool.top_k.extend(new_top_k)
            pool.ids.extend(enc.ids)
            pool.token_errors.extend((base + i, err) for i, err in errors)

    def _take_loop(self, burst: bool) -> None:
        """Take jobs into a pool; hand it to compute once it is full, or once ``max_wait_ms`` has
        passed and compute is free. While compute is busy the pool keeps filling (batches get
        fuller), polling with a backoff so the poll does not steal the cores the forward needs."""
        s = self.settings
        pool: Pool | None = None
        backoff = 0.5
        idle_sleep = 0.0005
        items_per_job = 1.0  # running estimate, to ask for about as many jobs as the pool has room for
        sized = False
        try:
            while not self._stop.is_set():
                room = s.max_pool_items - (len(pool.items) if pool else 0)
                slots: list[Slot] = []
                if room > 0:
                    # Until the first jobs show how many items a job holds, take one: 256 jobs of
                    # 64 texts would overshoot the pool sixteenfold.
                    want = max(1, min(s.take_jobs, math.ceil(room / items_per_job))) if sized else 1
                    block = 0.0 if (pool or burst) else (1.0 if len(self.queues) == 1 else 0.05)
                    try:
                        slots = self._take(want, block)
                        backoff = 0.5
                    except (redis.ConnectionError, redis.TimeoutError) as exc:
                        log.error("redis unavailable while taking jobs, retrying", error=str(exc), retry_in=backoff)
                        time.sleep(backoff)
                        backoff = min(backoff * 2, 30)
                        continue
                if slots:
                    idle_sleep = 0.0005
                    pool = pool or Pool()
                    before = len(pool.items)
                    self._prepare(pool, slots)
                    taken = (len(pool.items) - before) / len(slots)
                    if taken:
                        items_per_job = taken if not sized else max(1.0, 0.8 * items_per_job + 0.2 * taken)
                        sized = True
                if pool is None:
                    if burst and not slots:
                        if not self._busy():
                            return
                        time.sleep(0.002)
                    continue
                if not pool.slots:
                    pool = None
                    continue
                if len(pool.items) >= s.max_pool_items:
                    self._hand_over(pool)  # blocks until compute takes it
                    pool = None
                else:
                    age = time.monotonic() - pool.started
                    # Hand over once max_wait_ms has passed and no more jobs came in this round;
                    # while jobs keep arriving keep pooling (bigger pools sort better: a pool of
                    # 50 mixed texts pads ~1.5x, one of 1,000 ~1.07x), but never past max_pool_wait_ms.
                    due = age >= s.max_pool_wait_ms / 1000 or (age >= s.max_wait_ms / 1000 and not slots)
                    if due and self._compute_waiting.is_set():
                        try:
                            self._pools.put_nowait(pool)
                            pool = None
                        except queue_mod.Full:
                            pass
                    elif due:
                        # Compute is busy: keep the pool here and keep filling it (a pool parked
                        # in the hand-off queue could not grow), polling gently.
                        time.sleep(idle_sleep)
                        idle_sleep = min(idle_sleep * 2, 0.05)
                    elif not slots:
                        time.sleep(0.0005)
        finally:
            if pool is not None:
                self._leftover.extend(pool.slots)
            self._pools.put(_END)

    def _hand_over(self, pool: Pool) -> None:
        while True:
            try:
                self._pools.put(pool, timeout=0.2)
                return
            except queue_mod.Full:
                if self._stop.is_set():
                    self._leftover.extend(pool.slots)
                    return

    def _busy(self) -> bool:
        with self._lock:
            return bool(self._inflight)

    # -- completing -------------------------------------------------------------------------

    def _complete_loop(self) -> None:
        while True:
            slots = self._done.get()
            if slots is _END:
                return
            # Gather whatever else finished meanwhile: one pipeline for all of it.
            while True:
                try:
                    more = self._done.get_nowait()
                except queue_mod.Empty:
                    break
                if more is _END:
                    self._done.put(_END)
                    break
                slots = slots + more
            delay = 0.2
            while True:
                try:
                    self._complete(slots)
                    break
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    # Results are keyed by job and the run script is idempotent: retrying is safe.
                    log.error("redis unavailable while completing jobs, retrying", error=str(exc), retry_in=delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 10)

    def _complete(self, slots: list[Slot]) -> None:
        ok = [s for s in slots if s.error is None]
        failed = [s for s in slots if s.error is not None]
        ended = now()
        ended_ts = ended.timestamp()
        dependents_at: list[tuple[int, Slot]] = []
        with self.connection.pipeline(transaction=False) as pipe:
            for slot in ok:
                job, execution = slot.job, slot.execution
                job.ended_at = ended
                job._status = JobStatus.FINISHED
                result_ttl = job.get_result_ttl(self.default_result_ttl)
                pipe.hset(job.key, mapping={"status": JobStatus.FINISHED.value, "ended_at": utcformat(ended)})
                encoded = encode_results(slot.results)  # type: ignore[arg-type]
                # RQ's result entry (what Result.create writes), from the one encoding.
                result_key = Result.get_key(job.id)
                pipe.xadd(result_key, rq_success_fields(encoded, self.name, execution.id,
                                                         execution.created_at.timestamp(), ended_ts), maxlen=10)
                if result_ttl == -1:
                    pipe.persist(result_key)
                elif result_ttl is not None:
                    pipe.expire(result_key, result_ttl)
                if result_ttl != 0:
                    self._registries(slot.queue)[1].add(job, result_ttl, pipe)
                if result_ttl and result_ttl > 0:
                    # job.cleanup(), with the dependents check folded in: EXPIRE answers 1 only if
                    # the dependents set exists, which saves an EXISTS per job.
                    pipe.expire(job.key, result_ttl)
                    dependents_at.append((len(pipe), slot))
                    pipe.expire(job.dependents_key, result_ttl)
                    if job._dependency_ids:
                        pipe.expire(job.dependencies_key, result_ttl)
                else:
                    dependents_at.append((len(pipe), slot))
                    pipe.exists(job.dependents_key)
                    job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
                self._delete_execution(slot, pipe)
                if slot.request is not None and slot.request.run:
                    run_ttl = result_ttl if result_ttl and result_ttl > 0 else DEFAULT_RESULT_TTL
                    record_job(self.connection, pipe, slot.request.run, job.id, slot.results, run_ttl,  # type: ignore[arg-type]
                               encoded=encoded)
            item_errors = sum(1 for s in ok for r in s.results if r is not None and "error" in r)
            items = sum(len(s.results) for s in ok)
            if ok:
                pipe.hincrby(self.key, "qb_items", items)
                pipe.hincrby(self.key, "successful_job_count", len(ok))
                busy = sum((ended - s.job.started_at).total_seconds() for s in ok if s.job.started_at)
                pipe.hincrbyfloat(self.key, "total_working_time", busy)
            replies = pipe.execute()
        for index, slot in dependents_at:
            if replies[index]:
                slot.queue.enqueue_dependents(slot.job)
        for slot in failed:
            self._fail(slot)
        with self._lock:
            for slot in slots:
                self._inflight.pop(slot.job.id, None)
                self.executions.pop(slot.execution.id, None)
            idle = not self._inflight
        if idle:
            self.set_state(WorkerStatus.IDLE)
        self.completed_jobs += len(ok)
        self.completed_items += items
        if self.metrics is not None:
            self.metrics.count(items - item_errors, item_errors, len(ok), len(failed))

    def _fail(self, slot: Slot) -> None:
        """A job that cannot run at all fails in RQ with the reason; retrying would not help."""
        job = slot.job
        job.retries_left = 0
        job.ended_at = now()
        log.warning("job failed", job=job.id, error=slot.error)
        self.handle_job_failure(job, slot.queue, exc_string=slot.error or "", execution=slot.execution)
        try:
            kwargs = job.kwargs
        except Exception:
            return
        run, results = job_error_results(kwargs, slot.error or "job failed", slot.error_kind)
        if run:
            with self.connection.pipeline(transaction=False) as pipe:
                record_job(self.connection, pipe, run, job.id, results, DEFAULT_RESULT_TTL)
                pipe.execute()

    def _give_back_unstarted(self) -> None:
        """Jobs taken but never run go back to the front of their queue, as if never taken."""
        while True:
            try:
                pool = self._pools.get_nowait()
            except queue_mod.Empty:
                break
            if pool is not _END:
                self._leftover.extend(pool.slots)
        if not self._leftover:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            for slot in self._leftover:
                self._delete_execution(slot, pipe)
                slot.job.set_status(JobStatus.QUEUED, pipeline=pipe)
                pipe.lpush(slot.queue.key, slot.job.id)
            pipe.execute()
        with self._lock:
            for slot in self._leftover:
                self._inflight.pop(slot.job.id, None)
                self.executions.pop(slot.execution.id, None)
        log.info("gave back jobs not started", jobs=len(self._leftover))
        self._leftover = []

    # -- liveness -----------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_interval
        while not self._stop.wait(interval):
            try:
                ttl = self.get_heartbeat_ttl(None)  # type: ignore[arg-type]
                with self._lock:
                    slots = list(self._inflight.values())
                with self.connection.pipeline(transaction=False) as pipe:
                    self.heartbeat(ttl + 60, pipeline=pipe)
                    for slot in slots:
                        slot.execution.heartbeat(self._registries(slot.queue)[0], ttl, pipeline=pipe)
                    pipe.execute()
                self.recover_abandoned()
                if self.should_run_maintenance_tasks:
                    self.clean_registries()
            except Exception as exc:  # never let liveness die quietly
                log.error("heartbeat failed", error=repr(exc))

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
        self.last_cleaned_at = now()
