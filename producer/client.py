"""The client: submit texts, stream large inputs with backpressure, poll or subscribe for results."""

from __future__ import annotations

import itertools
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog
from rq import Callback, Queue, Retry
from rq.job import Job
from rq.registry import FinishedJobRegistry
from rq.results import Result

from . import keys
from .connection import connect, resolve_url
from .results import decode_entry, decode_rq_failure, decode_rq_return_value, finish_consumed
from .schema import Item, ItemResult, job_kwargs, normalize_item
from .serializer import JSONSerializer
from .settings import ClientSettings

log = structlog.get_logger(__name__)

#: Failure callback, named by path so the producer never imports the worker.
ON_FAILURE = keys.ON_FAILURE
#: Jobs enqueued per Redis round trip by enqueue_stream.
JOBS_PER_ROUND_TRIP = 16


class JobFailed(RuntimeError):
    """The job holding an item failed as a whole; the message is the worker's error."""


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Handle:
    """One submitted item: where its result will appear."""

    client: Client
    job_id: str
    item_id: str
    run_id: str | None = None

    def result(self, timeout: float | None = 0) -> ItemResult | None:
        """The item's result; waits up to ``timeout`` seconds (None: forever, 0: just look)."""
        return self.client.job_results(self.job_id, timeout=timeout, item_id=self.item_id)  # type: ignore[return-value]


@dataclass
class Run:
    """A set of items submitted together; results are read back in input order or as they come."""

    client: Client
    id: str
    enqueued: int = 0
    jobs: int = 0
    handles: list[Handle] = field(default_factory=list)

    def progress(self) -> dict[str, int]:
        return self.client.run_progress(self.id)

    def is_done(self) -> bool:
        p = self.progress()
        return bool(p["sealed"]) and p["done"] >= p["total"]

    def wait(self, timeout: float | None = None, poll: float = 0.05) -> bool:
        """Block until every item has a result; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_done():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True

    def results(self, timeout: float | None = None, consume: bool = False) -> Iterator[ItemResult]:
        """Every item's result, in input order, as soon as the results before it are in.

        ``consume=True`` deletes each job's results from Redis once they have been handed over,
        so a long stream keeps Redis memory bounded by what is in flight.
        """
        return self.client.ordered_results(self.id, timeout=timeout, consume=consume)

    def subscribe(self, from_start: bool = True) -> Subscription:
        return self.client.subscribe(self.id, from_start=from_start)


class Subscription:
    """Item results of a run as their jobs complete, read from the run's stream.

    ``last_id`` is the stream id of the last entry yielded: a subscriber that reconnects passes it
    back (``client.subscribe(run_id, last_id=...)``) and misses nothing. Iteration ends when the
    run is sealed and its last item is done.
    """

    def __init__(
        self, client: Client, run_id: str, last_id: str = "0-0", block_ms: int = 1000, timeout: float | None = None,
        on_idle: Callable[[], None] | None = None,
    ):
        self.client = client
        self.run_id = run_id
        self.last_id = last_id
        self.block_ms = block_ms
        self.timeout = timeout
        #: Called whenever a read comes back empty: lets a caller check its workers are alive.
        self.on_idle = on_idle
        self._seen_jobs: set[str] = set()

    def entries(self) -> Iterator[tuple[str, str, list[ItemResult]]]:
        """``(stream_id, job_id, results)`` per completed job, each job once."""
        conn = self.client.connection
        stream = keys.run_stream(self.run_id)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            reply = conn.xread({stream: self.last_id}, count=500, block=self.block_ms)
            got = False
            for _name, entries in reply or []:
                for entry_id, fields in entries:
                    got = True
                    self.last_id = entry_id.decode()
                    job_id, results = decode_entry(fields)
                    # The completion script already writes each job once; this guards a
                    # subscriber that resumes from an older id it had partly consumed.
                    if job_id in self._seen_jobs:
                        continue
                    self._seen_jobs.add(job_id)
                    yield self.last_id, job_id, results
            if got:
                continue
            if self.on_idle is not None:
                self.on_idle()
            # Nothing new: the run is over only if it is sealed and its done count says all
            # entries were written (the script counts and appends atomically).
            p = self.client.run_progress(self.run_id)
            if p["sealed"] and p["done"] >= p["total"]:
                tail = conn.xread({stream: self.last_id}, count=1)
                if not tail:
                    return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {self.run_id} not finished within {self.timeout} s")

    def __iter__(self) -> Iterator[ItemResult]:
        for _entry_id, _job_id, results in self.entries():
            yield from results


class Client:
    """Producer API. ``Client.from_url(url, queue="default")``."""

    def __init__(self, connection: redis.Redis, settings: ClientSettings | None = None):
        self.connection = connection
        self.settings = settings or ClientSettings.from_env()
        self._queues: dict[str, Queue] = {}

    @classmethod
    def from_url(cls, url: str | None = None, queue: str | None = None, **overrides: Any) -> Client:
        settings = ClientSettings.from_env(redis_url=resolve_url(url), queue=queue, **overrides)
        return cls(connect(settings.redis_url), settings)

    def queue(self, name: str | None = None) -> Queue:
        name = name or self.settings.queue
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = Queue(name, connection=self.connection, serializer=JSONSerializer)
        return q

    # -- submitting -------------------------------------------------------------------------

    def _job_data(self, items: list[Item], run_id: str | None, top_k: int | None, job_id: str) -> Any:
        s = self.settings
        # A deadline in the payload rather than RQ's `ttl` (which expires the job hash): a late
        # job is then dropped with a clear status that reaches the run's subscribers.
        deadline = time.time() + s.job_ttl if s.job_ttl else None
        return Queue.prepare_data(
            keys.JOB_FUNC,
            kwargs=job_kwargs(items, run_id, top_k, deadline),
            job_id=job_id,
            timeout=s.job_timeout,
            result_ttl=s.result_ttl,
            failure_ttl=s.result_ttl,
            retry=Retry(max=s.retries) if s.retries else None,
            on_failure=Callback(ON_FAILURE),
            description=f"classify {len(items)} text(s)" + (f" run={run_id}" if run_id else ""),
        )

    def _enqueue_chunks(
        self, chunks: list[list[Item]], run_id: str, top_k: int | None, queue: str | None
    ) -> tuple[list[str], dict[str, int]]:
        """Enqueue several jobs and count them in the run, in one round trip; returns job ids and
        the run's progress read in that same round trip (for backpressure)."""
        job_ids = [new_id() for _ in chunks]
        q = self.queue(queue)
        n_items = sum(len(c) for c in chunks)
        with self.connection.pipeline(transaction=False) as pipe:
            q.enqueue_many(
                [self._job_data(c, run_id, top_k, j) for c, j in zip(chunks, job_ids)], pipeline=pipe
            )
            meta = keys.run_meta(run_id)
            pipe.rpush(keys.run_jobs(run_id), *job_ids)
            pipe.hincrby(meta, "enqueued", n_items)
            pipe.hincrby(meta, "jobs", len(chunks))
            pipe.hsetnx(meta, "queue", q.name)
            pipe.hsetnx(meta, "created_at", f"{time.time():.3f}")
            pipe.zadd(keys.RUNS, {run_id: time.time()}, nx=True)
            ttl = self.settings.result_ttl
            for key in keys.run_keys(run_id):
                pipe.expire(key, ttl)
            pipe.hmget(meta, "enqueued", "done")
            replies = pipe.execute()
        enqueued, done = (int(v or 0) for v in replies[-1])
        return job_ids, {"enqueued": enqueued, "done": done}

    def seal(self, run_id: str, total: int | None = None) -> int:
        """Mark the run complete on the producer side: ``total`` is now final.

        The producer passes the count it enqueued itself: a pipeline retried across a Redis
        restart may have bumped the ``enqueued`` counter twice, but the producer's own tally is exact.
        """
        meta = keys.run_meta(run_id)
        if total is None:
            total = int(self.connection.hget(meta, "enqueued") or 0)
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hset(meta, mapping={"total": total, "sealed": 1})
            pipe.expire(meta, self.settings.result_ttl)
            pipe.execute()
        return total

    def submit(
        self, text_or_item: str | dict[str, Any], *, top_k: int | None = None, queue: str | None = None
    ) -> Handle:
        """One text (or ``{"id", "text", "meta"?}``) as one job; the handle polls its result."""
        item = normalize_item(text_or_item, new_id())
        run_id = new_id()
        (job_id,), _ = self._enqueue_chunks([[item]], run_id, top_k, queue)
        self.seal(run_id, 1)
        return Handle(self, job_id, item["id"], run_id)

    def submit_many(
        self,
        items: Iterable[str | dict[str, Any]],
        *,
        chunk_size: int | None = None,
        top_k: int | None = None,
        queue: str | None = None,
        run_id: str | None = None,
    ) -> list[Handle]:
        """Items in jobs of ``chunk_size`` (1: one job per item); one handle per item, all in one run."""
        run = self.enqueue_stream(
            items, chunk_size=chunk_size, top_k=top_k, queue=queue, run_id=run_id, max_pending=0, keep_handles=True
        )
        return run.handles

    def enqueue_stream(
        self,
        iterable: Iterable[str | dict[str, Any]],
        *,
        chunk_size: int | None = None,
        max_pending: int | None = None,
        run_id: str | None = None,
        top_k: int | None = None,
        queue: str | None = None,
        on_progress: Callable[[int], None] | None = None,
        keep_handles: bool = False,
    ) -> Run:
        """Enqueue an arbitrarily large iterable lazily, in pipelined round trips, as one run.

        Backpressure: while more than ``max_pending`` of this run's items are queued and not yet
        done, wait; a 10-million-line file thus never floods Redis. ``max_pending=0`` disables it.
        """
        chunk_size = chunk_size or self.settings.chunk_size
        max_pending = self.settings.max_pending if max_pending is None else max_pending
        run = Run(self, run_id or new_id())
        counter = itertools.count()
        source = (normalize_item(value, f"{next(counter)}") for value in iterable)
        batch: list[list[Item]] = []
        chunk: list[Item] = []

        def flush() -> None:
            job_ids, progress = self._enqueue_chunks(batch, run.id, top_k, queue)
            for job_id, items in zip(job_ids, batch):
                if keep_handles:
                    run.handles.extend(Handle(self, job_id, it["id"], run.id) for it in items)
                run.enqueued += len(items)
            run.jobs += len(job_ids)
            if on_progress is not None:
                on_progress(sum(len(c) for c in batch))
            batch.clear()
            if max_pending:
                self._wait_for_room(run.id, progress, max_pending)

        for item in source:
            chunk.append(item)
            if len(chunk) >= chunk_size:
                batch.append(chunk)
                chunk = []
                if len(batch) >= JOBS_PER_ROUND_TRIP:
                    flush()
        if chunk:
            batch.append(chunk)
        if batch:
            flush()
        self.seal(run.id, run.enqueued)
        log.debug("run enqueued", run=run.id, items=run.enqueued, jobs=run.jobs)
        return run

    def _wait_for_room(self, run_id: str, progress: dict[str, int], max_pending: int) -> None:
        pending = progress["enqueued"] - progress["done"]
        # Short polls: a long sleep here lets the workers drain the queue and then idle.
        delay = 0.002
        while pending > max_pending:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
            enqueued, done = (int(v or 0) for v in self.connection.hmget(keys.run_meta(run_id), "enqueued", "done"))
            pending = enqueued - done

    # -- reading results --------------------------------------------------------------------

    def run_progress(self, run_id: str) -> dict[str, int]:
        raw = self.connection.hmget(keys.run_meta(run_id), "enqueued", "total", "done", "errors", "sealed", "jobs")
        enqueued, total, done, errors, sealed, jobs = (int(v or 0) for v in raw)
        return {
            "enqueued": enqueued,
            "total": total if sealed else enqueued,
            "done": done,
            "errors": errors,
            "sealed": sealed,
            "jobs": jobs,
        }

    def job_results(
        self, job_id: str, timeout: float | None = 0, item_id: str | None = None
    ) -> list[ItemResult] | ItemResult | None:
        """A job's item results from RQ's result stream; None if not there within ``timeout``."""
        key = Result.get_key(job_id)
        if timeout == 0:
            reply = self.connection.xrevrange(key, "+", "-", count=1)
            entries = reply
        else:
            block = 0 if timeout is None else max(1, int(timeout * 1000))
            response = self.connection.xread({key: "0-0"}, block=block)
            entries = response[0][1][-1:] if response else []
        if not entries:
            return None
        _entry_id, payload = entries[-1]
        failure = decode_rq_failure(payload)
        value = decode_rq_return_value(payload)
        if value is None:
            raise JobFailed(f"job {job_id} failed: {failure or 'no result'}")
        if item_id is None:
            return value
        for result in value:
            if result.get("id") == item_id:
                return result
        return None

    def subscribe(
        self, run_id: str, from_start: bool = True, last_id: str | None = None, timeout: float | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> Subscription:
        """Item results as jobs complete; resumable from ``last_id``."""
        start = last_id or ("0-0" if from_start else self._stream_tail(run_id))
        return Subscription(self, run_id, last_id=start, timeout=timeout, on_idle=on_idle)

    def _stream_tail(self, run_id: str) -> str:
        last = self.connection.xrevrange(keys.run_stream(run_id), "+", "-", count=1)
        return last[0][0].decode() if last else "0-0"

    def ordered_results(
        self, run_id: str, timeout: float | None = None, on_idle: Callable[[], None] | None = None,
        consume: bool = False, before_delete: Callable[[], None] | None = None,
    ) -> Iterator[ItemResult]:
        """The run's item results in input order, each yielded as soon as all before it are in.

        Reads the run's stream once (a subscription) and its job list in order; memory holds only
        the results that arrived ahead of their turn. With ``consume`` the results of each job are
        deleted from Redis (stream entry, RQ result, job hash) once the caller has taken them;
        ``before_delete`` (a file's flush, say) runs before each deletion, so nothing is deleted
        that is not yet safe elsewhere.
        """
        entries = self.subscribe(run_id, timeout=timeout, on_idle=on_idle).entries()
        jobs_key = keys.run_jobs(run_id)
        arrived: dict[str, list[ItemResult]] = {}
        entry_ids: dict[str, str] = {}
        consumed: list[tuple[str, str | None]] = []
        yielded: set[str] = set()  # a job id listed twice (a retried enqueue) is yielded once
        window: deque[str] = deque()
        position = 0  # index in the run's job list of the next job to yield
        while True:
            if not window:
                sealed = self.run_progress(run_id)["sealed"]
                window.extend(j.decode() for j in self.connection.lrange(jobs_key, position, position + 9_999))
                if not window:
                    if sealed:  # sealed is set after the last job id was listed
                        if consumed:
                            if before_delete is not None:
                                before_delete()
                            self._delete_consumed(run_id, consumed, final=True)
                        return
                    time.sleep(0.05)  # the producer is still enqueueing
                    continue
            job_id = window.popleft()
            position += 1
            if job_id in yielded:
                continue
            while job_id not in arrived:
                try:
                    entry_id, done_job, results = next(entries)
                except StopIteration:
                    # The run finished but this job's entry is gone (its stream expired or was
                    # trimmed): fall back to RQ's own result for it.
                    fallback = self.job_results(job_id, timeout=0)
                    arrived[job_id] = fallback if isinstance(fallback, list) else []
                    break
                arrived[done_job] = results
                entry_ids[done_job] = entry_id
            yielded.add(job_id)
            yield from arrived.pop(job_id)
            if consume:
                # Only after the caller took them (the generator resumed): nothing is deleted unread.
                consumed.append((job_id, entry_ids.pop(job_id, None)))
                if len(consumed) >= 256:
                    if before_delete is not None:
                        before_delete()
                    self._delete_consumed(run_id, consumed)
                    consumed = []

    def _delete_consumed(self, run_id: str, consumed: list[tuple[str, str | None]], final: bool = False) -> None:
        queue = self.connection.hget(keys.run_meta(run_id), "queue")
        finished = FinishedJobRegistry.key_template.format(queue.decode()) if queue else None
        with self.connection.pipeline(transaction=False) as pipe:
            stream = keys.run_stream(run_id)
            ids = [e for _, e in consumed if e]
            if ids:
                pipe.xdel(stream, *ids)
            for job_id, _ in consumed:
                pipe.delete(Result.get_key(job_id), Job.key_for(job_id))
                if finished:
                    pipe.zrem(finished, job_id)
            if final:
                # The run is over and read: its bookkeeping goes too, and the run is marked consumed
                # so that a late second completion (a frozen worker thawing) cannot reopen it.
                finish_consumed(self.connection, pipe, run_id)
            pipe.execute()
