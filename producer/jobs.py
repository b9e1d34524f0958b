"""What a producer writes to Redis, as data: the commands of an enqueue, a seal, a resume check.

``Client`` (redis-py) and ``AsyncClient`` (redis.asyncio) both build their writes here and only
send them, so the jobs, run bookkeeping and cursor they leave in Redis are byte for byte the same
(``tests/test_async_client.py`` compares them) and workers, RQ's tools and either client cannot
tell who wrote a job.

RQ's ``Queue.enqueue_many`` only writes through a pipeline it is handed; it is handed a
:class:`CommandRecorder`, which keeps the calls instead of sending them, so the job hashes are
RQ's own (``Job.to_dict``, its status, its queue push) without this module copying RQ's fields.
Nothing here does I/O.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rq import Callback, Queue, Retry
from rq.job import Job, JobStatus
from rq.queue import EnqueueData
from rq.registry import FinishedJobRegistry
from rq.results import Result

from queuebert import keys
from queuebert.schema import Item, JobOptions, job_kwargs
from queuebert.serializer import JSONSerializer
from queuebert.settings import ClientSettings

#: Jobs enqueued per Redis round trip by enqueue_stream.
JOBS_PER_ROUND_TRIP = 16

#: RQ's ``Queue`` asks Redis for its version before it enqueues (``INFO``); the answer only lands on
#: the in-memory ``Job`` (``redis_server_version``, never in the job hash), so the recording queue
#: is given one instead of a connection to ask. Any version RQ supports will do.
_RECORDING_SERVER_VERSION = (7, 0, 0)


def new_id() -> str:
    return uuid.uuid4().hex


def resume_hint(run_id: str) -> str:
    return f"run it again with --run-id {run_id} (enqueue_stream(..., run_id={run_id!r})) to enqueue the rest"


class ResumeError(RuntimeError):
    """The run id names a run this input cannot continue: another producer is writing it, the input
    differs from the one it was started with, or it was started without a cursor."""


class LostWrites(ResumeError):
    """Redis no longer has jobs this producer wrote and was told were written (the run's cursor went
    back): a failover promoted a replica that lacked them, or Redis restarted without persistence.
    Resuming the run with the same input enqueues them again."""

    def __init__(self, run_id: str, listed: int, written: int):
        super().__init__(
            f"Redis lost jobs this producer had enqueued: run {run_id} lists {listed} jobs where {written} were "
            "written and acknowledged (a failover to a replica that lacked them, or a restart without "
            f"persistence); {resume_hint(run_id)}, the lost ones included (QUEUEBERT_REPLICA_ACKS makes "
            "writes wait for replicas)")
        self.run_id, self.listed, self.written = run_id, listed, written


@dataclass(frozen=True)
class Command:
    """One Redis command as a redis-py client method call (``pipe.hset(key, mapping=...)``)."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


class CommandRecorder:
    """A stand-in pipeline that keeps the write commands called on it, in order.

    Only the commands RQ's enqueue and this module issue are accepted: a read (whose reply the
    caller would need now) or an ``execute`` from a future RQ fails loudly here rather than
    writing something different from what the other client writes.
    """

    WRITES = frozenset({"sadd", "hset", "hsetnx", "hincrby", "rpush", "lpush", "expire", "zadd", "set", "hmget",
                        "xdel", "delete", "zrem", "zremrangebyrank", "lrem", "hget"})

    def __init__(self) -> None:
        self.commands: list[Command] = []

    def __getattr__(self, name: str) -> Any:
        if name not in self.WRITES:
            raise AttributeError(f"CommandRecorder records writes only; RQ called {name!r}")

        def record(*args: Any, **kwargs: Any) -> CommandRecorder:
            self.commands.append(Command(name, args, kwargs))
            return self

        return record

    def __bool__(self) -> bool:  # RQ checks ``if not connection``
        return True


def apply(commands: Sequence[Command], pipe: Any) -> None:
    """Queue ``commands`` on a redis-py or redis.asyncio pipeline (both buffer synchronously)."""
    for c in commands:
        getattr(pipe, c.name)(*c.args, **c.kwargs)


def job_data(settings: ClientSettings, items: list[Item], run_id: str | None, options: JobOptions,
             job_id: str) -> EnqueueData:
    """RQ's enqueue arguments of one classify job."""
    s = settings
    # A deadline in the payload rather than RQ's `ttl` (which expires the job hash): a late
    # job is then dropped with a clear status that reaches the run's subscribers.
    deadline = time.time() + s.job_ttl if s.job_ttl else None
    return Queue.prepare_data(
        keys.JOB_FUNC,
        kwargs=job_kwargs(items, run_id, deadline, options),
        job_id=job_id,
        timeout=s.job_timeout,
        result_ttl=s.result_ttl,
        failure_ttl=s.result_ttl,
        retry=Retry(max=s.retries) if s.retries else None,
        on_failure=Callback(keys.ON_FAILURE),
        description=f"classify {len(items)} text(s)" + (f" run={run_id}" if run_id else ""),
    )


def count_items(commands: Sequence[Command], counts: dict[str, int]) -> None:
    """Add each job's item count (``keys.JOB_ITEM_COUNT``) to the HSET that writes its hash.

    Riding in RQ's own HSET costs no command. RQ writes a job hash with one
    ``hset(key, mapping=...)`` (``Job.save``); a future RQ that writes it otherwise fails here,
    loudly, instead of leaving jobs that the queue-depth gauge would count as one item each.
    """
    tagged = set()
    for c in commands:
        if c.name != "hset" or "mapping" not in c.kwargs or not c.args:
            continue
        key = c.args[0].decode() if isinstance(c.args[0], bytes) else str(c.args[0])
        job_id = key.removeprefix(Job.redis_job_namespace_prefix)
        if key.startswith(Job.redis_job_namespace_prefix) and job_id in counts:
            c.kwargs["mapping"][keys.JOB_ITEM_COUNT] = counts[job_id]
            tagged.add(job_id)
    if len(tagged) != len(counts):
        raise RuntimeError(f"RQ's enqueue wrote no job hash for {sorted(set(counts) - tagged)[:3]} "
                           "as one HSET mapping: queuebert cannot record their item counts")


def enqueue_commands(
    settings: ClientSettings, queue: str, chunks: Sequence[list[Item]], job_ids: Sequence[str], run_id: str,
    options: JobOptions, *, chunk_size: int | None = None, cursor_end: int | None = None,
) -> list[Command]:
    """The writes that enqueue ``chunks`` as jobs ``job_ids`` of run ``run_id``, ending with an
    ``HMGET`` of the run's ``enqueued`` and ``done`` (the last reply, for backpressure).

    A stream's round (``chunk_size`` and ``cursor_end`` given) also records its chunk size and
    moves the run's cursor to ``cursor_end``; it is meant to run inside the transaction that
    watches the cursor.
    """
    recorder = CommandRecorder()
    # The recorder stands in for RQ's connection and pipeline (the commands they would send, kept):
    # RQ types them as redis.Redis and Pipeline.
    q = Queue(queue, connection=recorder, serializer=JSONSerializer)  # type: ignore[arg-type]
    q.redis_server_version = _RECORDING_SERVER_VERSION
    q.enqueue_many([job_data(settings, list(c), run_id, options, j) for c, j in zip(chunks, job_ids)],
                   pipeline=recorder)  # type: ignore[arg-type]
    count_items(recorder.commands, {j: len(c) for c, j in zip(chunks, job_ids)})
    pipe = recorder
    meta = keys.run_meta(run_id)
    ttl = settings.result_ttl
    pipe.rpush(keys.run_jobs(run_id), *job_ids)
    pipe.hincrby(meta, "enqueued", sum(len(c) for c in chunks))
    pipe.hincrby(meta, "jobs", len(chunks))
    pipe.hsetnx(meta, "queue", q.name)
    if chunk_size is not None:
        pipe.hsetnx(meta, "chunk_size", chunk_size)
    pipe.hsetnx(meta, "created_at", f"{time.time():.3f}")
    pipe.hset(meta, "ttl", ttl)  # how long completions keep the run (run_record.lua)
    pipe.zadd(keys.RUNS, {run_id: time.time()}, nx=True)
    # The index keeps the newest runs only: it has no TTL of its own, and every run adds to it.
    pipe.zremrangebyrank(keys.RUNS, 0, -settings.max_indexed_runs - 1)
    if cursor_end is not None:
        pipe.set(keys.run_cursor(run_id), cursor_end, ex=ttl)
    for key in keys.run_keys(run_id):
        pipe.expire(key, ttl)
    pipe.hmget(meta, "enqueued", "done")
    return recorder.commands


def seal_commands(settings: ClientSettings, run_id: str, total: int) -> list[Command]:
    """Mark the run complete on the producer side: ``total`` is now final."""
    meta = keys.run_meta(run_id)
    return [Command("hset", (meta,), {"mapping": {"total": total, "sealed": 1}}),
            Command("expire", (meta, settings.result_ttl))]


def round_size(chunks: Sequence[list[Item]]) -> int:
    """What a round may add to Redis's memory, over-estimated (job hashes, RQ's fields, the run's
    lists): zlib usually shrinks the texts, so the real figure is smaller."""
    return sum((len(it["text"]) if isinstance(it.get("text"), str) else 0) + 64 for c in chunks for it in c) \
        + 1024 * len(chunks)


def check_cursor(run_id: str, cursor: int, start: int, end: int) -> bool:
    """Whether the round ``start..end`` of run ``run_id`` is in already (its reply was lost), given
    the run's cursor; raises when the run moved in a way this producer cannot continue."""
    if cursor >= end:
        return True
    if cursor < start:
        raise LostWrites(run_id, cursor, start)
    if cursor != start:
        raise ResumeError(f"run {run_id} lists {cursor} jobs where this producer expected {start}: "
                          "another producer is enqueueing the same run id")
    return False


#: What enqueue_stream reads of a run before it starts (``GET`` cursor, then this ``HMGET``).
RESUME_FIELDS = ("chunk_size", "queue", "sealed", "total", "jobs")


@dataclass
class ResumePlan:
    """How an enqueue_stream call continues a run (or starts it): from the run's stored state."""

    chunk_size: int
    queue: str | None
    resume_from: int  # jobs already listed, skipped without being sent
    sealed: bool
    total: int  # a sealed run's item count
    listed: int  # a sealed run's job count


def resume_plan(settings: ClientSettings, run_id: str, raw_cursor: Any, stored: Sequence[Any],
                chunk_size: int | None, queue: str | None, log: Any) -> ResumePlan:
    """Read the replies of ``GET cursor`` and ``HMGET meta RESUME_FIELDS``: a resumed run keeps the
    chunking and queue it was started with (other chunks would not line up with the jobs already
    listed; asking for others explicitly is worth a warning)."""
    stored_chunk, stored_queue, sealed, total, listed = stored
    resume_from = int(raw_cursor or 0)
    if stored_chunk is not None and int(stored_chunk) != (chunk_size or int(stored_chunk)):
        log.warning("resuming with the run's chunk size", run=run_id, chunk_size=int(stored_chunk), asked=chunk_size)
    chunk_size = int(stored_chunk) if stored_chunk is not None else chunk_size or settings.chunk_size
    if stored_queue is not None and resume_from:
        if queue is not None and queue != stored_queue.decode():
            log.warning("resuming on the run's queue", run=run_id, queue=stored_queue.decode(), asked=queue)
        queue = stored_queue.decode()
    is_sealed = sealed is not None and bool(int(sealed))
    if not is_sealed and raw_cursor is None and int(listed or 0):
        raise ResumeError(f"run {run_id} was enqueued without a cursor (by an older producer or submit()): "
                          "it cannot be resumed; enqueue the input as a new run")
    if resume_from and not is_sealed:
        log.info("resuming run", run=run_id, jobs_already_listed=resume_from)
    return ResumePlan(chunk_size, queue, resume_from, is_sealed, int(total or 0), int(listed or 0))


def parse_progress(raw: Sequence[Any]) -> dict[str, int]:
    """The reply of ``HMGET meta PROGRESS_FIELDS`` as a run's progress."""
    enqueued, total, done, errors, sealed, jobs = (int(v or 0) for v in raw)
    return {
        "enqueued": enqueued,
        "total": total if sealed else enqueued,
        "done": done,
        "errors": errors,
        "sealed": sealed,
        "jobs": jobs,
    }


#: The run meta fields a progress read takes, in parse_progress's order.
PROGRESS_FIELDS = ("enqueued", "total", "done", "errors", "sealed", "jobs")


def delete_consumed_commands(run_id: str, queue: bytes | str | None,
                             consumed: Sequence[tuple[str, str | None]]) -> list[Command]:
    """What a consuming reader deletes once it has handed over ``consumed`` (``(job id, run-stream
    entry id)``): the stream entries, RQ's results and job hashes, and the finished-registry
    members of the run's ``queue`` (from the run's meta; None when it is gone)."""
    rec = CommandRecorder()
    if isinstance(queue, bytes):
        queue = queue.decode()
    finished = FinishedJobRegistry.key_template.format(queue) if queue else None
    ids = [e for _, e in consumed if e]
    if ids:
        rec.xdel(keys.run_stream(run_id), *ids)
    for job_id, _ in consumed:
        rec.delete(Result.get_key(job_id), Job.key_for(job_id))
        if finished:
            rec.zrem(finished, job_id)
    return rec.commands


def forget_job_commands(job_id: str, queue: str, status: bytes | str | None) -> list[Command]:
    """What forgetting a job nobody waits for (``AsyncClient.release``) writes, by its status
    (``HGET`` just before): a finished job's hash (its input texts), RQ result and finished-registry
    entry go, as a consuming reader deletes them; a queued one is taken off its queue (``LREM``,
    whose reply says whether it was still there: then :func:`drop_dequeued_commands`); any other
    (under way, failed, scheduled for a retry) is left to RQ and expires by its TTLs: a worker that
    holds it must find it, and a failed one stays in RQ's failed registry. A delivered answer's
    job is finished, so the common case never scans a queue."""
    if isinstance(status, bytes):
        status = status.decode()
    if status == JobStatus.FINISHED.value:
        return [Command("delete", (Result.get_key(job_id), Job.key_for(job_id))),
                Command("zrem", (FinishedJobRegistry.key_template.format(queue), job_id))]
    if status == JobStatus.QUEUED.value:
        return [Command("lrem", (Queue.redis_queue_namespace_prefix + queue, 1, job_id))]
    return []


def drop_dequeued_commands(job_id: str) -> list[Command]:
    """A job ``LREM`` took off its queue: no worker has it or ever will (a worker takes a job off
    the queue first, into RQ's intermediate list or its started registry), so its hash goes."""
    return [Command("delete", (Job.key_for(job_id),))]
