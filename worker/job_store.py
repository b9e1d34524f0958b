"""RQ's per-job bookkeeping for many jobs at once, in one Lua call per round.

Taking a job the RQ way (``Job.fetch_many``, ``Execution.create``, ``job.prepare_for_execution``)
and completing it (``Result.create``, ``FinishedJobRegistry.add``, ``job.cleanup``,
``Execution.delete``, plus queuebert's run-stream record) costs about 340 µs of Python per job:
object construction, uuid4, datetime formatting and ~20 redis-py commands packed one by one. For
one-text jobs that is more than the forward pass. :class:`JobStore` writes exactly the same keys,
fields, scores and TTLs, but with one ``EVALSHA`` per round of jobs for taking and one for
completing, so what is left in Python per job is building a few arguments and reading a few
reply fields.

Everything RQ's tools read stays as RQ writes it (``rq info``, ``rq requeue``,
``Job.get_status()``, ``job.latest_result()``, ``job.get_executions()``, the started/finished
registries and their maintenance), because every key name comes from RQ's own classes and every
value follows RQ's conventions:

- registry scores are ``current_timestamp() + ttl`` in integer seconds (``-1`` means ``+inf``);
- execution hashes hold float timestamps (``repr`` of ``datetime.timestamp()``);
- job hashes hold ``rq.utils.utcformat`` strings.

These are computed once per call in Python and passed as ARGV, by name (:class:`ArgLayout`). The
scripts (``worker/lua/*.lua``) hard-code no key name: key prefixes, derived from RQ's classes, are
constants set when a script is loaded, and queuebert's run keys come from :mod:`queuebert.keys`.

Not handled here: jobs that use RQ features this module does not implement, and failures. The
completer sends those to RQ's own ``handle_job_success`` / ``handle_job_failure``
(:mod:`worker.rq_completion` decides which; :meth:`TakenJob.execution` gives the
:class:`rq.executions.Execution` they want). ``tests/test_rq_parity.py`` runs the same jobs through
RQ's ``SimpleWorker`` and through ``BatchWorker`` and compares everything both leave in Redis.
"""

from __future__ import annotations

import functools
import json
import os
import time
import zlib
from base64 import b64encode
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import redis
import structlog
from rq import Queue
from rq.defaults import DEFAULT_WORKER_TTL
from rq.exceptions import DeserializationError
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.utils import utcformat, utcparse
from rq.worker import WorkerStatus

from queuebert import keys, scripts
from queuebert.results import RUN_RECORD_CONSTANTS
from queuebert.scripts import ArgLayout
from queuebert.serializer import ForeignJobError, JSONSerializer

from .rq_completion import RQ_FEATURES

log = structlog.get_logger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


# Named arguments of the scripts in worker/lua (ARGV[ARG.<name>], ARGV[i + JOB.<name>]): the Python
# side builds each argument list from these names, the scripts read them by the same names.


class TakeArgs(NamedTuple):
    want: int
    ttl: int
    worker: str
    created_at: str
    now_utc: str
    now_ts: int
    worker_ttl: int
    take_id: str
    first_queue: int
    first_id: str


class Taken(NamedTuple):
    """One registered job in take.lua's reply."""

    queue: int
    id: bytes
    data: bytes
    enqueued_at: bytes | None
    result_ttl: bytes | None
    dependency_ids: bytes | None
    dependency_id: bytes | None
    execution_id: bytes
    rq_features: bytes | None


class CompleteArgs(NamedTuple):
    queues: int
    ended_at: str
    execution_ended_at: str
    now_ts: int
    now: str
    worker: str
    ended_us: int


class CompleteJobArgs(NamedTuple):
    id: str
    queue: int
    execution_id: str
    execution_started_at: str
    return_value: bytes
    result_ttl: int
    has_dependencies: int
    run: int
    items: int
    errors: int
    results: bytes
    started_us: int


class HeartbeatArgs(NamedTuple):
    beat: str
    ttl: int
    now_ts: int


class HeldJobArgs(NamedTuple):
    id: str
    execution_id: str
    queue: int


def _layouts(args: tuple[str, ...] | None, job: tuple[str, ...] | None) -> dict[str, Any]:
    """Script constants for a fixed argument layout (``ARG``) and/or a per-job one (``JOB``), from
    their NamedTuples' ``_fields``."""
    out: dict[str, Any] = {}
    if args is not None:
        out.update(ARG=ArgLayout(args), ARG_SIZE=len(args))
    if job is not None:
        out.update(JOB=ArgLayout(job, first=0), JOB_SIZE=len(job))
    return out


@dataclass(slots=True)
class TakenJob:
    """One job registered as started by :meth:`JobStore.take`: what the worker needs to run and
    complete it, read from the job hash in the same script that registered it."""

    id: str
    queue_index: int  # index into the queues given to JobStore
    execution_id: str
    created_at: float  # execution created_at, as written to the execution hash
    started_us: int  # job started_at (same instant), microseconds since the epoch, for working time
    data: bytes  # the job hash's raw 'data' field (zlib-compressed serializer payload)
    enqueued_at: float | None
    result_ttl: int | None  # the job hash's result_ttl (None: the worker's default applies)
    has_dependencies: bool  # so completion also expires rq:job::<id>:dependencies, as job.cleanup does
    #: The RQ features it uses that the fast path leaves to RQ's handlers, as their marker fields
    #: (comma-separated, e.g. ``repeats_left``; see worker.rq_completion.RQ_FEATURES).
    rq_features: str | None = None

    @property
    def composite_key(self) -> str:
        """``<job id>:<execution id>``, the member RQ keeps in the started registry."""
        return f"{self.id}:{self.execution_id}"

    def decode(self) -> tuple[str, list[Any], dict[str, Any]]:
        """``(func_name, args, kwargs)`` as ``Job.func_name/args/kwargs`` would give them.

        Raises :class:`rq.exceptions.DeserializationError` for a payload that is not JSON (a pickled
        job, say), as RQ's ``Job`` does, so callers keep one error path, and
        :class:`queuebert.serializer.ForeignJobError` (a ``JobError``) for one that names a function
        other than queuebert's, so the job fails with that reason.
        """
        try:
            raw = zlib.decompress(self.data)
        except zlib.error:
            raw = self.data  # RQ falls back to an uncompressed payload too
        try:
            func_name, _instance, args, kwargs = JSONSerializer.loads(raw)
        except ForeignJobError:
            raise  # readable, but names something not queuebert's: the caller reports why
        except Exception as exc:
            raise DeserializationError() from exc
        return func_name, args, kwargs

    def execution(self, connection: redis.Redis, worker_name: str) -> Execution:
        """An RQ :class:`Execution` for this job, for RQ's own Python paths (heartbeat, failure)."""
        execution = Execution(id=self.execution_id, job_id=self.id, connection=connection, worker_name=worker_name)
        execution.created_at = execution.last_heartbeat = datetime.fromtimestamp(self.created_at, tz=UTC)
        return execution


@dataclass(slots=True)
class Completion:
    """A successfully finished job and what it produced."""

    job: TakenJob
    results: str  # the results JSON, encoded once with queuebert.results.encode_results
    run_id: str | None
    items: int
    errors: int  # items whose result is an error


def _split_template(make: Callable[[str], str]) -> tuple[str, str]:
    """The text around the id in a key RQ builds from an id, so the scripts can build the same key
    without repeating RQ's key formats (which also follow ``RQ_KEY_PREFIX``)."""
    marker = "QBIDMARKER"
    key = make(marker)
    before, found, after = key.partition(marker)
    if not found or marker in after:
        raise RuntimeError(f"cannot derive a key template from {key!r}")
    return before, after


def _prefix(make: Callable[[str], str]) -> str:
    before, after = _split_template(make)
    if after:
        raise RuntimeError(f"key template has a suffix after the id: {before!r} .. {after!r}")
    return before


def _utc_timestamp(value: bytes | None) -> float | None:
    """A job hash time (``utcformat``) as a timestamp; ``fromisoformat`` is ~20x cheaper than
    ``rq.utils.utcparse``'s ``strptime``, which stays the fallback for anything unusual."""
    if not value:
        return None
    text = value.decode()
    try:
        return datetime.fromisoformat(text.removesuffix("Z")).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return utcparse(text).timestamp()


def _has_dependencies(ids_json: bytes | None, legacy_id: bytes | None) -> bool:
    """Whether ``Job.restore`` would give a non-empty ``_dependency_ids``."""
    if ids_json:
        return bool(json.loads(ids_json))
    return bool(legacy_id)


class JobStore:
    """Takes and completes jobs of some queues for one worker, one script call per round.

    The data written is exactly what RQ's own worker writes, so RQ's tools and maintenance keep
    working; see the module docstring.
    """

    def __init__(
        self,
        connection: redis.Redis,
        worker_name: str,
        worker_key: str,
        executions_key: str,
        queues: Sequence[Queue],
        worker_ttl: int = DEFAULT_WORKER_TTL,
    ):
        self.connection = connection
        self.worker_name = worker_name
        self.worker_key = worker_key
        self.executions_key = executions_key
        self.queues = list(queues)
        # What Worker.heartbeat gives the worker hash and executions set.
        self.worker_key_ttl = worker_ttl + 60
        #: Jobs still queued in this store's queues after the last take (a burst is under way).
        self.left = 0
        self._started = [StartedJobRegistry(queue=q) for q in self.queues]
        self._take_keys = [worker_key, executions_key]
        self._complete_keys = [worker_key, executions_key]
        for q, started in zip(self.queues, self._started):
            self._take_keys += [q.key, q.intermediate_queue_key, started.key]
            self._complete_keys += [started.key, FinishedJobRegistry(queue=q).key]
        self.job_prefix = _prefix(Job.key_for)
        # Execution keys are <prefix><job id>:<execution id> (the composite key after a prefix).
        self.execution_prefix, after = _split_template(
            lambda marker: Execution(id="E", job_id=marker, connection=connection).key)
        if after != ":E":
            raise RuntimeError(f"unexpected execution key layout: {self.execution_prefix!r} .. {after!r}")
        self.execution_registry_prefix = _prefix(
            lambda marker: ExecutionRegistry(job_id=marker, connection=connection).key)
        dependents = _split_template(Job.dependents_key_for)
        if dependents[0] != self.job_prefix:
            raise RuntimeError(f"dependents key {dependents} does not start with the job key {self.job_prefix!r}")
        dependencies = _split_template(lambda marker: Job(marker, connection=connection).dependencies_key)
        prefixes = {"JOB_PREFIX": self.job_prefix, "EXECUTION_PREFIX": self.execution_prefix,
                    "EXECUTION_REGISTRY_PREFIX": self.execution_registry_prefix}
        self._take_script = self._register("take.lua", {
            **prefixes, **_layouts(TakeArgs._fields, None), "TAKEN": ArgLayout(Taken._fields),
            "STARTED": JobStatus.STARTED.value, "BUSY": WorkerStatus.BUSY.value,
            "RQ_FEATURE_FIELDS": tuple(RQ_FEATURES)})
        self._complete_script = self._register("complete.lua", {
            **prefixes, **_layouts(CompleteArgs._fields, CompleteJobArgs._fields), **RUN_RECORD_CONSTANTS,
            "RESULT_PREFIX": _prefix(Result.get_key), "DEPENDENTS_SUFFIX": dependents[1],
            "DEPENDENCIES_PREFIX": dependencies[0], "DEPENDENCIES_SUFFIX": dependencies[1],
            "FINISHED": JobStatus.FINISHED.value, "SUCCESSFUL": str(Result.Type.SUCCESSFUL.value)})
        self._heartbeat_script = self._register(
            "heartbeat.lua", {**prefixes, **_layouts(HeartbeatArgs._fields, HeldJobArgs._fields)})
        self._give_back_script = self._register("give_back.lua", {
            **prefixes, **_layouts(None, HeldJobArgs._fields), "QUEUED": JobStatus.QUEUED.value})
        self._state_script = self._register("state.lua", {})
        self._requeue_intermediate_script = self._register("requeue_intermediate.lua", {})

    def _register(self, name: str, constants: dict[str, Any]) -> Any:
        return self.connection.register_script(_source(name, tuple(sorted(constants.items(), key=_by_name))))

    @classmethod
    def for_worker(cls, worker: Any, queues: Sequence[Queue] | None = None) -> JobStore:
        """A store for an RQ worker's name, keys, TTL and (by default) queues."""
        return cls(worker.connection, worker.name, worker.key, worker.executions_key,
                   queues if queues is not None else worker.queues, worker_ttl=worker.worker_ttl)

    # -- taking ---------------------------------------------------------------------------------

    def take(
        self, want: int, ttl: int, first: tuple[int, str] | None = None
    ) -> tuple[list[TakenJob], list[tuple[int, str]]]:
        """Pop up to ``want`` job ids from the queues in order (the first queue drained first) and
        register each as started, atomically, with what RQ writes for a started job:
        ``Execution.create(job, ttl, pipeline, worker_name)``, ``job.prepare_for_execution``, a
        PERSIST of a job hash with an RQ ``ttl``, and the worker's heartbeat and BUSY state.

        ``first`` is ``(queue index, job id)`` of a job the caller already BLMOVEd into that
        queue's intermediate list while blocking for work; it counts towards ``want``, and the
        script removes it from the intermediate list and registers it first.

        Returns the registered jobs and ``(queue index, id)`` of ids whose job hash no longer
        exists (expired or deleted while queued): nothing is registered for those and they are
        no longer in any list, so the caller only has to log them.
        """
        moment = datetime.now(UTC)
        created = moment.timestamp()
        started_us = (moment - _EPOCH) // _US
        take_id = os.urandom(12).hex()  # 24 hex + an 8-hex counter: as unique as uuid4().hex
        fq, fid = (first[0] + 1, first[1]) if first is not None else (0, "")
        args = TakeArgs(want=want, ttl=ttl, worker=self.worker_name, created_at=repr(created),
                        now_utc=utcformat(moment), now_ts=int(created), worker_ttl=self.worker_key_ttl,
                        take_id=take_id, first_queue=fq, first_id=fid)
        taken_flat, gone_flat, self.left = self._take_script(keys=self._take_keys, args=args)
        taken: list[TakenJob] = []
        size = len(Taken._fields)
        for i in range(0, len(taken_flat), size):
            # Unpacked in Taken's order (what take.lua writes by name), without a NamedTuple per job.
            q, job_id, data, enqueued, result_ttl, dep_ids, dep_id, execution_id, features = taken_flat[i:i + size]
            taken.append(TakenJob(
                id=job_id.decode(), queue_index=q - 1, execution_id=execution_id.decode(), created_at=created,
                started_us=started_us, data=data, enqueued_at=_utc_timestamp(enqueued),
                result_ttl=int(result_ttl) if result_ttl else None,
                has_dependencies=_has_dependencies(dep_ids, dep_id),
                rq_features=features.decode() if features else None,
            ))
        gone = [(gone_flat[i] - 1, gone_flat[i + 1].decode()) for i in range(0, len(gone_flat), 2)]
        for q, job_id in gone:
            log.info("job gone before it started, dropped", job=job_id, queue=self.queues[q].name)
        return taken, gone

    # -- completing -----------------------------------------------------------------------------

    def complete(self, done: Sequence[Completion], default_result_ttl: int) -> list[str]:
        """Record successfully finished jobs as RQ's ``handle_job_success`` does: job hash FINISHED
        and ``ended_at``; RQ's result entry (``rq:results:<id>``, MAXLEN ~10, the fields of RQ's
        ``Result.serialize``) and its TTL; the finished registry;
        ``job.cleanup``'s EXPIREs; ``Execution.delete``; the worker's ``successful_job_count`` and
        ``total_working_time`` (and queuebert's ``qb_items``); and each job's run record
        (``run_record.lua``: a job's entry and counts once, however often it completes).

        Returns the ids of jobs it left untouched because their dependents set exists: the caller
        completes those with RQ's ``handle_job_success``, which releases dependents atomically
        with the completion. Raises ValueError, before writing anything, for a job whose result
        TTL is 0 (see :func:`worker.rq_completion.needs_rq`).
        """
        if not done:
            return []
        moment = datetime.now(UTC)
        ended = moment.timestamp()
        run_index: dict[str, int] = {}
        run_keys: list[str] = []
        args: list[Any] = list(CompleteArgs(queues=len(self.queues), ended_at=utcformat(moment),
                                            execution_ended_at=repr(ended), now_ts=int(ended),
                                            now=f"{time.time():.3f}", worker=self.worker_name,
                                            ended_us=(moment - _EPOCH) // _US))
        append = args.extend
        for c in done:
            job = c.job
            result_ttl = job.result_ttl if job.result_ttl is not None else default_result_ttl
            if result_ttl == 0:
                raise ValueError(f"job {job.id} has result_ttl 0: complete it with RQ's handlers")
            r = 0
            if c.run_id:
                r = run_index.get(c.run_id, 0)
                if not r:
                    r = run_index[c.run_id] = len(run_index) + 1
                    run_keys += keys.run_keys(c.run_id)
            encoded = c.results.encode()
            # In CompleteJobArgs' order (test_complete_arguments_follow_their_layout checks it), as a
            # plain tuple: a NamedTuple per job would cost more than the rest of this loop.
            append((job.id, job.queue_index + 1, job.execution_id, repr(job.created_at), b64encode(encoded),
                    result_ttl, 1 if job.has_dependencies else 0, r, c.items, c.errors, encoded, job.started_us))
        replies = self._complete_script(keys=self._complete_keys + run_keys, args=args)
        return [job_id.decode() for job_id in replies]

    # -- liveness -------------------------------------------------------------------------------

    def heartbeat(self, jobs: Sequence[TakenJob], ttl: int) -> None:
        """Extend every running job's execution as ``Execution.heartbeat`` does, in one call."""
        if not jobs:
            return
        moment = datetime.now(UTC)
        args: list[Any] = list(HeartbeatArgs(beat=repr(moment.timestamp()), ttl=ttl, now_ts=int(moment.timestamp())))
        for job in jobs:
            args += HeldJobArgs(id=job.id, execution_id=job.execution_id, queue=job.queue_index + 1)
        self._heartbeat_script(keys=[r.key for r in self._started], args=args)

    def publish_state(self, state: str) -> None:
        """``qb_redis`` in the worker hash (see state.lua), even while Redis is at maxmemory."""
        self._state_script(keys=[self.worker_key], args=[state, self.worker_key_ttl])

    # -- giving back ----------------------------------------------------------------------------

    def give_back(self, jobs: Sequence[TakenJob]) -> int:
        """Return jobs this worker still holds to the front of their queues, in one call; jobs it no
        longer holds (requeued by maintenance, finished elsewhere) only lose its bookkeeping.
        Returns how many went back."""
        if not jobs:
            return 0
        keys_: list[str] = [self.executions_key]
        for q, started in zip(self.queues, self._started):
            keys_ += [q.key, started.key]
        args: list[Any] = []
        # Reversed: each LPUSH puts its job in front, so the first taken ends up first again.
        for job in reversed(jobs):
            args += HeldJobArgs(id=job.id, execution_id=job.execution_id, queue=job.queue_index + 1)
        return int(self._give_back_script(keys=keys_, args=args))

    def requeue_intermediate(self, queue: Queue, job_id: str) -> bool:
        """Put a job from ``queue``'s intermediate list back at its front, unless a take moved it
        on meanwhile; True if it went back."""
        return bool(self._requeue_intermediate_script(keys=[queue.intermediate_queue_key, queue.key], args=[job_id]))

    def delete_executions(self, jobs: Sequence[TakenJob], pipeline: Any) -> None:
        """Queue on ``pipeline`` what ``Execution.delete`` does for each job (for a job whose hash
        is gone, where RQ's handlers have no job to clean up after)."""
        for job in jobs:
            composite = job.composite_key
            pipeline.delete(self.execution_prefix + composite)
            pipeline.zrem(self._started[job.queue_index].key, composite)
            pipeline.zrem(self.execution_registry_prefix + job.id, job.execution_id)
            pipeline.srem(self.executions_key, composite)


def _by_name(item: tuple[str, Any]) -> str:
    return item[0]


@functools.cache
def _source(name: str, constants: tuple[tuple[str, Any], ...]) -> str:
    """A worker script's text, built once per set of constants (key prefixes follow RQ's classes)."""
    return scripts.load("worker", name, dict(constants))
