"""The batching worker: an RQ worker that pools many jobs' items into micro-batches in-process.

:class:`BatchWorker` is RQ's ``SimpleWorker`` with RQ's hooks filled in (heartbeat TTL, stop
signals, registration, maintenance, recovery of abandoned jobs) and three parts wired together,
so the device never waits on Redis:
- the taker (:mod:`worker.taker`, its own thread) takes many jobs per round trip, registered as
  started the way RQ does, and tokenizes their items into the length-sorted pool
  (:mod:`worker.scheduler`);
- compute (:mod:`worker.compute`, the main thread) sweeps batches from the pool through the model
  and hands each job on as soon as its last item is done;
- the completer (:mod:`worker.completer`, its own thread) writes results, registries and
  run-stream entries for all finished jobs in one script call.
Which thread may touch a taken job when is written in one place, :mod:`worker.slots`. A heartbeat
thread, here, keeps executions alive and runs RQ's registry maintenance, which is also what
recovers the jobs of a worker that was killed.

A Redis error in any thread is weather (:mod:`worker.outage`): the thread backs off and retries, and
while completing fails the taker takes nothing new, so what the worker holds stays bounded by its
pool. Any other exception in a thread is a bug: the worker stops (jobs it held are given back, or
recovered by RQ once their executions expire) and the process exits non-zero, so a supervisor
restarts it; it never goes on half-alive.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import redis
import structlog
from redis.typing import EncodableT, FieldT
from rq import Queue, worker_registration
from rq.job import Job
from rq.registry import StartedJobRegistry, clean_registries
from rq.timeouts import TimerDeathPenalty
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from queuebert import keys, upstream
from queuebert.job import QueuebertJob
from queuebert.serializer import JSONSerializer
from queuebert.settings import WorkerSettings

from .completer import Completer
from .compute import Compute
from .engine import Engine
from .job_store import JobStore
from .metrics import WorkerMetrics
from .outage import Outage
from .probes import WorkerProbes
from .scheduler import BatchScheduler, ItemPool
from .slots import Finished, Inflight
from .taker import Taker

log = structlog.get_logger(__name__)


class _StopWhileStarting(BaseException):
    """A stop signal while the worker registers (a BaseException: no retry loop swallows it)."""


class BatchWorker(SimpleWorker):
    """RQ worker that runs queuebert jobs in-process, micro-batched across jobs.

    Start it with ``queuebert worker ...`` or ``rq worker -w worker.BatchWorker`` (settings from
    ``QUEUEBERT_*`` variables). It always uses JSON: a pickled job is refused, never executed.
    """

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
        upstream.set_worker_queues(self, [Queue(q.name, connection=self.connection, serializer=JSONSerializer,
                                                job_class=QueuebertJob) for q in self.queues])
        self.engine = engine
        self._stop = threading.Event()
        #: Reads RQ's command channel (``rq shutdown``...) in place of RQ's pub/sub thread.
        self.commands: upstream.CommandListener | None = None
        #: True while the worker registers: nothing is held yet, so a stop signal ends it at once.
        self._starting = False
        self._signals = 0  # counted: a burst ending sets _stop too, which is not a first signal
        self.inflight = Inflight()
        self.finished = Finished()
        # Built by assemble(), once the engine is loaded. The pool is not RQ's `self.scheduler`
        # (RQ's scheduler process, which RQ's teardown stops if set).
        self.pool: ItemPool | None = None
        self.store: JobStore | None = None
        self.metrics: WorkerMetrics | None = None
        self.taker: Taker | None = None
        self.compute: Compute | None = None
        self.completer: Completer | None = None
        #: Set when a thread died of a bug: the worker stops and the process exits non-zero.
        self.fatal: BaseException | None = None
        #: The worker's own threads (take, complete, heartbeat), started once it registered: what
        #: its liveness probe checks (worker.probes).
        self.loops: list[threading.Thread] = []
        #: Set when shutdown can wait no longer for the completer (Redis refusing writes).
        self._abandon = threading.Event()
        self.outages = {name: Outage(name, on_change=self._on_outage)
                        for name in ("take", "complete", "heartbeat", "maintenance")}

    @property
    def completed_jobs(self) -> int:
        return self.completer.completed_jobs if self.completer is not None else 0

    @property
    def completed_items(self) -> int:
        return self.completer.completed_items if self.completer is not None else 0

    # -- RQ hooks ---------------------------------------------------------------------------

    def get_heartbeat_ttl(self, job: Job | None, working_time: float = 0.0) -> int:
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
        self._stop.set()
        if self._starting:
            # Registering holds nothing, and a registration step may be blocked on a Redis that
            # does not answer: raising here is what interrupts it.
            log.info("stopping before the worker started", worker=self.name, signal=signum)
            raise _StopWhileStarting
        log.info("stopping after the batch in progress", worker=self.name, signal=signum)
        upstream.note_shutdown_requested(self)

    def _handle_stop_signals(self) -> None:
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGTERM, self.request_stop)

    def subscribe(self) -> None:
        """RQ's command channel, read by :class:`queuebert.upstream.CommandListener`: RQ's own
        listener made every exit wait up to a minute under redis-py 8.2."""
        listener = upstream.CommandListener(self.connection, self.pubsub_channel_name, self.handle_payload)
        listener.start()
        self.commands = listener

    def unsubscribe(self) -> None:
        """Stops reading commands (a tenth of a second; at most 2 s with Redis gone), sending nothing to Redis."""
        if self.commands is not None:
            self.commands.stop()

    # -- main loop --------------------------------------------------------------------------

    def load_engine(self) -> Engine:
        if self.engine is None:
            from .tasks import get_engine

            self.engine = get_engine(self.settings)
        return self.engine

    def assemble(self) -> None:
        """Load the engine and build the pool, the job store and the three parts around them.
        Nothing here talks to Redis; :meth:`work` calls it, tests may call it alone."""
        engine = self.load_engine()
        s = self.settings
        self.pool = pool = BatchScheduler(engine.max_batch_size, engine.max_batch_tokens, s.max_pool_items)
        self.metrics = WorkerMetrics(model=engine.m.name, device=str(engine.m.device))
        self.metrics.load.labels(**self.metrics.labels).set(engine.m.load_seconds)
        queues = upstream.ordered_queues(self)
        self.store = store = JobStore.for_worker(self, queues)
        self.taker = Taker(connection=self.connection, store=store, queues=queues, engine=engine,
                           pool=pool, settings=s, inflight=self.inflight, finished=self.finished,
                           outages=self.outages, execution_ttl=self.get_heartbeat_ttl(None),
                           stop=self._stop)
        self.compute = Compute(engine=engine, pool=pool, inflight=self.inflight, finished=self.finished,
                               max_wait=s.max_wait_ms / 1000, metrics=self.metrics, stop=self._stop,
                               taker_done=self.taker.done)
        self.completer = Completer(worker=self, store=store, inflight=self.inflight, finished=self.finished,
                                   outage=self.outages["complete"], metrics=self.metrics, abandon=self._abandon)

    def work(self, burst: bool = False, logging_level: str | None = None, *args: Any, **kwargs: Any) -> bool:
        """Load the model, then take, batch, run and complete jobs until stopped (or, in burst
        mode, until the queues are empty)."""
        burst = burst or self.settings.burst
        self.assemble()
        pool, taker, compute, completer, metrics = self.pool, self.taker, self.compute, self.completer, self.metrics
        assert pool is not None and taker is not None and compute is not None and completer is not None
        assert metrics is not None
        if self.settings.metrics_port:
            metrics.serve(self.settings.metrics_port, probes=WorkerProbes(self))
            log.info("serving metrics", port=self.settings.metrics_port)
        self._handle_stop_signals()
        self._starting = True
        try:
            registered = self._register(logging_level or "WARNING")
        except _StopWhileStarting:
            registered = False
        finally:
            self._starting = False
        if not registered:
            # Stopped before it took anything: only the worker key (if written) to remove.
            self._bounded(self._deregister, self.settings.stop_timeout)
            self.unsubscribe()
            return False
        taking = self._thread(lambda: taker.run(burst), "qb-take")
        completing = self._thread(completer.run, "qb-complete")
        self._thread(self._heartbeat_loop, "qb-heartbeat")
        try:
            self._guarded(compute.run)
        finally:
            self._stop.set()
            pool.close()
            self._hand_back(taking, completing)
            log.info("worker stopped", worker=self.name, jobs=self.completed_jobs, items=self.completed_items,
                     **({"fatal": repr(self.fatal)} if self.fatal is not None else {}))
        return self.completed_jobs > 0

    def _hand_back(self, taking: threading.Thread, completing: threading.Thread) -> None:
        """Once compute has ended: complete what was computed, give back what was not, deregister.

        All of it talks to Redis, so it runs in a thread of its own that gets ``stop_timeout``
        seconds: a Redis that is gone, frozen or refusing writes cannot hold the worker past its
        orchestrator's grace period. What Redis has not taken by then stays in the started
        registry (and RQ's intermediate list), where any worker recovers it once its executions
        expire, as for a killed worker.
        """
        timeout = self.settings.stop_timeout
        deadline = time.monotonic() + timeout

        def left(reserve: float = 0.0) -> float:
            return max(0.0, deadline - time.monotonic() - reserve)

        def hand_back() -> None:
            assert self.taker is not None
            taking.join(left(reserve=timeout / 2))
            self.taker.return_unstarted()
            self.finished.close()
            # Completing is worth most of the time (results are computed work); giving back and
            # deregistering are each one call.
            completing.join(left(reserve=min(3.0, timeout / 4)))
            if completing.is_alive():  # still retrying a Redis that refuses writes: stop waiting
                self._abandon.set()
                completing.join(left())
            # Whatever is still held (a completion Redis kept refusing, jobs a dying thread left
            # behind) goes back to its queue.
            self.taker.give_back(self.inflight.held(), "not completed")
            self._deregister()

        if not self._bounded(hand_back, left()):
            self._abandon.set()
            log.warning("stopping without Redis's answer: what the worker still holds is recovered from the "
                        "started registry once its executions expire", stop_timeout_s=timeout,
                        held=len(self.inflight.held()))
        self.unsubscribe()

    def _bounded(self, target: Callable[[], None], timeout: float) -> bool:
        """Run ``target`` in a daemon thread for up to ``timeout`` seconds; False if it is still
        running then (blocked on Redis: it ends with the process)."""
        thread = threading.Thread(target=self._guarded, args=(target,), name="qb-stop", daemon=True)
        thread.start()
        thread.join(timeout + 0.5)
        return not thread.is_alive()

    def _thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=self._guarded, args=(target,), name=name, daemon=True)
        thread.start()
        self.loops.append(thread)
        return thread

    def _register(self, logging_level: str) -> bool:
        """RQ's ``bootstrap`` (register the worker, subscribe to its commands), then queuebert's
        fields, each step retried while Redis refuses it: a worker started against a full or
        read-only Redis waits for it instead of dying. False if stopped meanwhile."""
        from rq.logutils import setup_loghandlers

        setup_loghandlers(logging_level, name="rq.worker")
        setup_loghandlers(logging_level, name="rq.job")
        steps = [
            self.register_birth,
            self.subscribe,
            # Beside RQ's fields, so `queuebert stats` and the gateway's /info can say what each
            # worker serves.
            lambda: self.connection.hset(self.key, mapping=self._model_fields()),
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

    def _model_fields(self) -> dict[FieldT, EncodableT]:
        """queuebert's fields in the worker hash (``keys.WORKER_MODEL_FIELDS``): the model served."""
        engine = self.engine
        assert engine is not None
        return dict(zip(keys.WORKER_MODEL_FIELDS, (
            engine.m.name, str(engine.m.device), str(engine.m.dtype).removeprefix("torch."),
            json.dumps(engine.m.labels), engine.m.max_length, engine.m.function)))

    def _register_again_if_forgotten(self) -> bool:
        """Register again when Redis no longer lists this worker (it restarted without
        persistence, or was flushed): otherwise RQ's tools, ``queuebert stats`` and the gateway's
        ``/health`` and ``/info`` would never see it again, though it keeps serving its queues.
        The same writes as :meth:`_register` (RQ's ``register_birth``: its hash, the worker sets,
        the TTL; then the model fields and the state) in one transaction; not the subscription,
        which redis-py renews on reconnect. ``register_birth`` itself refuses here: the heartbeat
        has already recreated part of the hash. True if it registered."""
        if self._stop.is_set() or self.connection.sismember(self.redis_workers_keys, self.key):
            return False  # a stopping worker deregisters: it must not come back
        self.last_heartbeat = now()
        with self.connection.pipeline() as pipe:
            pipe.delete(self.key)  # the partial hash the heartbeat recreated
            pipe.hset(self.key, mapping={**self.serialize(), **self._model_fields()})
            self.set_state(self.get_state(), pipeline=pipe)
            worker_registration.register(self, pipe)
            pipe.expire(self.key, self.worker_ttl + 60)
            pipe.execute()
        log.warning("Redis had forgotten this worker (restarted without persistence?): registered it again",
                    worker=self.name, queues=self.queue_names())
        return True

    def _guarded(self, target: Callable[[], None]) -> None:
        """Run a thread's loop; an exception that is not Redis weather (each loop rides those out
        itself) is a bug: stop the worker rather than leave it running without this thread."""
        try:
            target()
        except Exception as exc:
            if self.fatal is None:
                self.fatal = exc
            log.exception("worker thread died: stopping the worker", thread=threading.current_thread().name,
                          error=repr(exc))
            self._stop.set()
            if self.pool is not None:
                self.pool.close()

    def _deregister(self) -> None:
        """RQ's ``register_death``, tolerating a Redis that refuses writes: the worker key then
        expires by itself and its jobs are recovered from the started registry."""
        try:
            self.register_death()
        except redis.RedisError as exc:
            log.warning("could not deregister the worker; its key expires by itself", error=str(exc))

    def _on_outage(self, outage: Outage) -> None:
        if self.metrics is not None:
            self.metrics.redis_down.labels(**self.metrics.labels, component=outage.component).set(
                1 if outage.down else 0)

    # -- liveness -----------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        """Each interval: extend the executions of held jobs (first: it is what keeps them from
        being recovered under us), register again if Redis forgot the worker, the worker's own
        heartbeat, then maintenance. Each step rides out Redis errors on its own; a failing step
        never skips the ones after it."""
        interval = self.settings.heartbeat_interval
        beat, upkeep = self.outages["heartbeat"], self.outages["maintenance"]
        while not self._stop.wait(interval):
            ttl = self.get_heartbeat_ttl(None)
            jobs = self.inflight.jobs()
            try:
                assert self.store is not None
                self.store.heartbeat(jobs, ttl)
                self._register_again_if_forgotten()
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
        assert self.store is not None
        problems = [d for d in (o.describe() for o in self.outages.values()) if d]
        self.store.publish_state("; ".join(problems) if problems else "ok")

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
                    registry.cleanup(exception_handlers=upstream.exception_handlers(self))
                self._recover_intermediate(q)

    def _recover_intermediate(self, q: Queue) -> None:
        """Requeue jobs stuck in RQ's intermediate list: a worker blocked for work BLMOVEs a job
        there and its take script moves it on within a round trip, so one still there 3 heartbeat
        intervals after a recovery pass first saw it belongs to a worker that died in between.
        RQ's own cleanup (in maintenance) waits a minute, then counts it as a failure: with the
        gateway's 30 s request timeout, that request got 504. The first-seen marks are RQ's."""
        intermediate = q.intermediate_queue
        patience = timedelta(seconds=3 * self.settings.heartbeat_interval)
        for job_id in intermediate.get_job_ids():
            first_seen = intermediate.get_first_seen(job_id)
            if first_seen is None:
                intermediate.set_first_seen(job_id)
                continue
            if now() - first_seen <= patience:
                continue
            store = self.store if self.store is not None else JobStore.for_worker(self, upstream.ordered_queues(self))
            if store.requeue_intermediate(q, job_id):
                log.warning("requeued a job a dead worker left in RQ's intermediate list", queue=q.name, job=job_id)
            self.connection.delete(intermediate.get_first_seen_key(job_id))

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
                handlers = upstream.exception_handlers(self)
                self._started_registry(q).cleanup(exception_handlers=handlers)
                clean_registries(q, handlers)
                worker_registration.clean_worker_registry(q)
                q.intermediate_queue.cleanup(self, q)
            finally:
                q.release_maintenance_lock()
        self.clean_group_registries()
        # RQ's BaseWorker.__init__ sets last_cleaned_at = None, unannotated: its type reads as None.
        self.last_cleaned_at = now()  # type: ignore[assignment]
