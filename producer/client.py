"""The client: submit texts, stream large inputs with backpressure, poll or subscribe for results."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog
from rq import Queue
from rq.results import Result

from queuebert import keys
from queuebert.connection import connect, resolve_url
from queuebert.results import decode_entry, decode_rq_failure, decode_rq_return_value, finish_consumed
from queuebert.schema import DEFAULT_HYPOTHESIS_TEMPLATE, Item, ItemResult, normalize_item
from queuebert.serializer import JSONSerializer
from queuebert.settings import ClientSettings

from . import jobs, pairs
from .jobs import JOBS_PER_ROUND_TRIP, JobOptions, LostWrites, ResumeError, new_id, resume_hint

log = structlog.get_logger(__name__)

#: Failure callback, named by path so the producer never imports the worker.
ON_FAILURE = keys.ON_FAILURE
_resume_hint = resume_hint

__all__ = ["JOBS_PER_ROUND_TRIP", "Client", "Handle", "JobFailed", "LostWrites", "RedisFull", "ResumeError", "Run",
           "Subscription", "new_id"]


class JobFailed(RuntimeError):
    """The job holding an item failed as a whole; the message is the worker's error."""


class RedisFull(RuntimeError):
    """Redis stayed out of memory (OOM at ``maxmemory``) longer than ``redis_full_timeout``.

    Nothing of the round that hit OOM went in (rounds are transactions), so ``enqueued`` is exact and
    the run resumes cleanly with its run id.
    """

    def __init__(self, run_id: str, enqueued: int, maxmemory: str, waited: float):
        super().__init__(
            f"Redis is full (OOM at maxmemory {maxmemory}) and had no room for {waited:.1f} s: run {run_id} "
            f"stopped with {enqueued} items enqueued; {_resume_hint(run_id)}"
        )
        self.run_id = run_id
        self.enqueued = enqueued


def job_value(job_id: str, payload: dict[bytes, bytes]) -> list[ItemResult]:
    """A job's item results from its ``rq:results:<job>`` entry; JobFailed for a failed job."""
    value = decode_rq_return_value(payload)
    if value is None:
        raise JobFailed(f"job {job_id} failed: {decode_rq_failure(payload) or 'no result'}")
    return value  # type: ignore[no-any-return]


def pick_item(results: list[ItemResult], item_id: str, index: int | None = None) -> ItemResult | None:
    """The result of item ``item_id`` among its job's (at ``index`` when known: ids given by callers
    may repeat within a job)."""
    if index is not None and index < len(results) and results[index].get("id") == item_id:
        return results[index]
    for result in results:
        if result.get("id") == item_id:
            return result
    return None


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
    #: Items an earlier, interrupted enqueue of this run had already sent (resume); counted in
    #: ``enqueued`` too.
    skipped: int = 0

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

    def results(
        self, timeout: float | None = None, consume: bool = False, before_delete: Callable[[], None] | None = None,
    ) -> Iterator[ItemResult]:
        """Every item's result, in input order, as soon as the results before it are in.

        ``consume=True`` deletes each job's results from Redis once they have been handed over,
        so a long stream keeps Redis memory bounded by what is in flight. A caller that buffers
        what it took (a file) passes ``before_delete`` to make it safe first (flush, fsync).
        """
        return self.client.ordered_results(self.id, timeout=timeout, consume=consume, before_delete=before_delete)

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


class FullWaitState:
    """Waiting for a full (or nearly full, see ``tight``) Redis: exponential backoff, a deadline per
    spell, and one log line per minute at most (a stream that Redis's memory paces waits briefly
    before nearly every round; it says so once, not each time).

    The decisions only; :class:`_FullWait` (redis-py) and the async client's wait do the I/O
    around them (``INFO memory``, the sleep), so both clients wait alike.
    """

    #: Seconds between two "Redis is full" lines.
    LOG_EVERY = 60.0
    #: Seconds a Redis without ``maxmemory`` (or with INFO disabled) goes unasked again.
    LIMIT_RECHECK = 5.0

    def __init__(self, settings: ClientSettings, run: Any):
        self.settings = settings
        self.run = run  # has .id and .enqueued
        self.since: float | None = None
        self.delay = 0.05
        self.maxmemory = "?"
        self._limit: int | None = None  # maxmemory in bytes, 0: none
        self._limit_checked = 0.0
        self._logged_at: float | None = None
        self.spells = 0  # how often this stream had to wait for room

    def start(self, now: float) -> bool:
        """Called before each wait: True when a new spell is to be logged (look up maxmemory)."""
        if self.since is None:
            self.since, self.delay = now, 0.05
            self.spells += 1
            if self._logged_at is None or now - self._logged_at >= self.LOG_EVERY:
                self._logged_at = now
                return True
        return False

    def log_full(self, maxmemory: str) -> None:
        self.maxmemory = maxmemory
        log.warning(f"Redis is full (maxmemory {maxmemory}): waiting for results to be consumed",
                    run=self.run.id, enqueued=self.run.enqueued, give_up_after_s=self.settings.redis_full_timeout)

    def sleep_for(self, now: float) -> float:
        """Seconds to sleep before the next try; RedisFull once the spell has lasted ``redis_full_timeout``."""
        assert self.since is not None
        timeout = self.settings.redis_full_timeout
        waited = now - self.since
        if waited >= timeout:
            raise RedisFull(self.run.id, self.run.enqueued, self.maxmemory, waited)
        seconds = min(self.delay, timeout - waited)
        self.delay = min(self.delay * 2, 2.0)
        return seconds

    def needs_info(self, now: float) -> bool:
        """Whether ``tight`` needs an ``INFO memory`` now: one per round while a limit is set;
        without one (looked for again every few seconds) it costs nothing."""
        if self.settings.redis_headroom <= 0:
            return False
        return not (self._limit == 0 and now - self._limit_checked < self.LIMIT_RECHECK)

    def tight_from(self, info: dict[str, Any] | None, adding: int, now: float) -> bool:
        """Whether ``adding`` more bytes would bring Redis within ``redis_headroom`` of its
        ``maxmemory``, from ``INFO memory`` (None: INFO is disabled, rely on OOM alone)."""
        if info is None:
            self._limit, self._limit_checked = 0, now
            return False
        self._limit, self._limit_checked = int(info.get("maxmemory", 0) or 0), now
        return bool(self._limit) and int(info.get("used_memory", 0)) + adding > \
            (1 - self.settings.redis_headroom) * self._limit

    def clear(self) -> None:
        if self.since is not None:
            log.debug("Redis has room again", run=self.run.id, waited_s=round(time.monotonic() - self.since, 1))
            self.since = None


def maxmemory_text(info: dict[str, Any]) -> str:
    return str(info.get("maxmemory_human") or info.get("maxmemory") or "?")


class _FullWait(FullWaitState):
    """:class:`FullWaitState` on a redis-py connection."""

    def __init__(self, client: Client, run: Run):
        super().__init__(client.settings, run)
        self.client = client

    def wait(self) -> None:
        """Sleep before the next try; RedisFull once the spell has lasted ``redis_full_timeout``."""
        now = time.monotonic()
        if self.start(now):
            self.log_full(self._maxmemory())
        time.sleep(self.sleep_for(now))

    def tight(self, adding: int = 0) -> bool:
        """Whether ``adding`` more bytes would bring Redis within ``redis_headroom`` of its
        ``maxmemory``: then this stream waits before sending them, as it does at OOM."""
        now = time.monotonic()
        if not self.needs_info(now):
            return False
        try:
            info = self.client.connection.info("memory")
        except redis.ResponseError:  # INFO disabled (some managed services): rely on OOM alone
            info = None
        return self.tight_from(info, adding, now)

    def _maxmemory(self) -> str:
        # INFO rather than CONFIG GET, which managed Redis services often disable.
        try:
            return maxmemory_text(self.client.connection.info("memory"))
        except redis.RedisError:
            return "?"


class Client:
    """Producer API. ``Client.from_url(url, queue="default")``."""

    #: Times an enqueue round is looked at again after its watched connection failed (backing off
    #: to 2 s: about a minute in all) before the enqueue stops with a resumable error.
    LOST_REPLY_TRIES = 35

    def __init__(self, connection: redis.Redis, settings: ClientSettings | None = None):
        self.connection = connection
        self.settings = settings or ClientSettings.from_env()
        self._queues: dict[str, Queue] = {}

    @classmethod
    def from_url(cls, url: str | None = None, queue: str | None = None, **overrides: Any) -> Client:
        settings = ClientSettings.from_env(redis_url=resolve_url(url), queue=queue, **overrides)
        return cls(connect(settings.redis_url, replica_acks=settings.replica_acks,
                           replica_ack_timeout_ms=settings.replica_ack_timeout_ms), settings)

    def queue(self, name: str | None = None) -> Queue:
        name = name or self.settings.queue
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = Queue(name, connection=self.connection, serializer=JSONSerializer)
        return q

    # -- submitting -------------------------------------------------------------------------

    def _enqueue_chunks(
        self, chunks: list[list[Item]], run_id: str, options: JobOptions, queue: str | None
    ) -> tuple[list[str], dict[str, int]]:
        """Enqueue jobs of a fresh run in one plain pipeline (``submit``: one text, one round trip).

        Streams use :meth:`_enqueue_round` instead, which is a transaction that can be resumed."""
        job_ids = [new_id() for _ in chunks]
        commands = jobs.enqueue_commands(self.settings, queue or self.settings.queue, chunks, job_ids, run_id, options)
        with self.connection.pipeline(transaction=False) as pipe:
            jobs.apply(commands, pipe)
            replies = pipe.execute()
        enqueued, done = (int(v or 0) for v in replies[-1])
        return job_ids, {"enqueued": enqueued, "done": done}

    def seal(self, run_id: str, total: int | None = None) -> int:
        """Mark the run complete on the producer side: ``total`` is now final.

        The producer passes the count it enqueued itself: a pipeline retried across a Redis
        restart may have bumped the ``enqueued`` counter twice, but the producer's own tally is exact.
        """
        if total is None:
            total = int(self.connection.hget(keys.run_meta(run_id), "enqueued") or 0)
        with self.connection.pipeline(transaction=False) as pipe:
            jobs.apply(jobs.seal_commands(self.settings, run_id, total), pipe)
            pipe.execute()
        return total

    def submit(
        self, text_or_item: str | dict[str, Any], *, text_pair: str | None = None, top_k: int | None = None,
        function_to_apply: str | None = None, queue: str | None = None,
    ) -> Handle:
        """One text (or ``{"id", "text", "text_pair"?, "meta"?}``) as one job; the handle polls its
        result. ``text_pair`` makes it a pair, as the pipeline's ``{"text", "text_pair"}``."""
        item = normalize_item(text_or_item, new_id())
        if text_pair is not None:
            item["text_pair"] = text_pair
        run_id = new_id()
        (job_id,), _ = self._enqueue_chunks([[item]], run_id, JobOptions(top_k, function_to_apply), queue)
        self.seal(run_id, 1)
        return Handle(self, job_id, item["id"], run_id)

    def rerank(
        self, query: str, passages: Sequence[str], *, top_n: int | None = None, return_text: bool = False,
        label: str | None = None, timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """Passages ranked by a cross-encoder's score for ``(query, passage)``, best first:
        ``[{"index", "score", "text"?}]`` as text-embeddings-inference's ``/rerank`` returns.
        ``label`` names the relevance label of a model with several (else it must have one)."""
        (answer,) = self.rerank_many([{"query": query, "passages": list(passages)}], top_n=top_n,
                                     return_text=return_text, label=label, timeout=timeout)
        return answer["results"]

    def rerank_many(
        self, queries: Iterable[dict[str, Any]], *, top_n: int | None = None, return_text: bool = False,
        label: str | None = None, timeout: float | None = None, run_id: str | None = None,
        chunk_size: int | None = None, max_pending: int | None = None,
        on_enqueued: Callable[[int], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """``{"id", "results": [{"index", "score", "text"?}], "meta"?}`` per ``{"id"?, "query",
        "passages"}``, in input order. All pairs go out as one run (``enqueue_stream``, with its
        backpressure) while answers come back, and each query's results leave Redis once read."""
        return pairs.rerank_stream(self, queries, run_id=run_id or new_id(), top_n=top_n, return_text=return_text,
                                   label=label, chunk_size=chunk_size, max_pending=max_pending, timeout=timeout,
                                   on_enqueued=on_enqueued)

    def zero_shot(
        self, texts: str | Iterable[str | dict[str, Any]], candidate_labels: Sequence[str] | str, *,
        hypothesis_template: str = DEFAULT_HYPOTHESIS_TEMPLATE, multi_label: bool = False,
        timeout: float | None = None, run_id: str | None = None, chunk_size: int | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """``pipeline("zero-shot-classification")`` through the queue: ``{"id", "labels",
        "scores"}`` per text, labels best first (one dict for one text, as the pipeline). The
        pairs of all texts are batched together by the workers."""
        single = isinstance(texts, str)
        items = (pairs.zero_shot_item(t, candidate_labels, hypothesis_template, multi_label)
                 for t in ([texts] if single else texts))
        results = list(pairs.stream_through(self, items, run_id=run_id or new_id(), chunk_size=chunk_size,
                                            max_pending=0, timeout=timeout))
        return results[0] if single else results  # type: ignore[return-value]

    def submit_many(
        self,
        items: Iterable[str | dict[str, Any]],
        *,
        chunk_size: int | None = None,
        top_k: int | None = None,
        function_to_apply: str | None = None,
        queue: str | None = None,
        run_id: str | None = None,
    ) -> list[Handle]:
        """Items in jobs of ``chunk_size`` (1: one job per item); one handle per item, all in one run."""
        run = self.enqueue_stream(
            items, chunk_size=chunk_size, top_k=top_k, function_to_apply=function_to_apply, queue=queue,
            run_id=run_id, max_pending=0, keep_handles=True
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
        function_to_apply: str | None = None,
        queue: str | None = None,
        on_progress: Callable[[int], None] | None = None,
        keep_handles: bool = False,
    ) -> Run:
        """Enqueue an arbitrarily large iterable lazily, in pipelined round trips, as one run.

        Backpressure: while more than ``max_pending`` of this run's items are queued and not yet
        done, wait; a 10-million-line file thus never floods Redis. ``max_pending=0`` disables it.
        A Redis that refuses writes (OOM at ``maxmemory``) is waited out too, with backoff, for up to
        ``settings.redis_full_timeout`` seconds; then :class:`RedisFull` is raised.

        Each round of jobs is a transaction checked against the run's cursor, so a round whose
        reply was lost is never applied twice. Resuming: called again with the ``run_id`` of an
        interrupted call and the same input, it re-reads the input, rebuilds the same chunks (with
        the chunk size and queue stored in the run), skips the jobs already listed without sending
        them, enqueues the rest and seals the run. Item ids default to the input position, so they
        are the same on every read. A sealed run is not enqueued again: the input is only counted,
        and :class:`ResumeError` is raised if its count differs from the run's.

        Counting: the returned ``Run.enqueued`` / ``Run.jobs`` are the whole run's, items found
        already enqueued included; ``Run.skipped`` says how many of them an earlier call enqueued.
        ``on_progress`` is called once with that skipped count, when skipping ends, then with each
        round's item count, so a progress bar shows the whole run.
        """
        run = Run(self, run_id or new_id())
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.get(keys.run_cursor(run.id))
            pipe.hmget(keys.run_meta(run.id), *jobs.RESUME_FIELDS)
            raw_cursor, stored = pipe.execute()
        plan = jobs.resume_plan(self.settings, run.id, raw_cursor, stored, chunk_size, queue, log)
        chunk_size, queue, resume_from = plan.chunk_size, plan.queue, plan.resume_from
        max_pending = self.settings.max_pending if max_pending is None else max_pending
        counter = itertools.count()
        source = (normalize_item(value, f"{next(counter)}") for value in iterable)

        if plan.sealed:
            return self._resume_sealed(run, source, plan.total, plan.listed, chunk_size, keep_handles, on_progress)

        full = _FullWait(self, run)
        batch: list[list[Item]] = []
        chunk: list[Item] = []
        position = 0  # chunks built so far = index in the run's job list of the next chunk
        skipped_ids: list[list[str]] = []  # with keep_handles: item ids of the chunks skipped

        def skipping_done() -> None:
            if run.skipped:
                if keep_handles:
                    self._skipped_handles(run, skipped_ids)
                if on_progress is not None:
                    on_progress(run.skipped)
                log.info("skipped what was already enqueued", run=run.id, items=run.skipped, jobs=run.jobs)

        def take(items: list[Item]) -> None:
            nonlocal position
            position += 1
            if position <= resume_from:
                run.skipped += len(items)
                run.enqueued += len(items)
                run.jobs += 1
                if keep_handles:
                    skipped_ids.append([it["id"] for it in items])
                return
            if position == resume_from + 1:
                skipping_done()
            batch.append(items)
            if len(batch) >= JOBS_PER_ROUND_TRIP:
                flush()

        def flush() -> None:
            start = position - len(batch)
            job_ids, progress = self._enqueue_round(batch, run, start, chunk_size, JobOptions(top_k, function_to_apply),
                                                    queue, full)
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

        try:
            for item in source:
                chunk.append(item)
                if len(chunk) >= chunk_size:
                    take(chunk)
                    chunk = []
            if chunk:
                take(chunk)
            if position < resume_from:
                raise ResumeError(f"run {run.id} already lists {resume_from} jobs but this input makes only "
                                  f"{position} of {chunk_size} items: it is not the input the run was started with")
            if position == resume_from:
                skipping_done()
            if batch:
                flush()
            self._seal_waiting(run, full)
        except (RedisFull, ResumeError):
            raise
        except BaseException as exc:  # Ctrl-C, a lost connection, an unreadable input line
            exc.add_note(f"run {run.id}: {run.enqueued} items enqueued; {_resume_hint(run.id)}")
            raise
        log.debug("run enqueued", run=run.id, items=run.enqueued, jobs=run.jobs, skipped=run.skipped)
        return run

    def _enqueue_round(
        self, chunks: list[list[Item]], run: Run, start: int, chunk_size: int, options: JobOptions,
        queue: str | None, full: _FullWait,
    ) -> tuple[list[str], dict[str, int]]:
        """Enqueue the jobs at positions ``start ..`` of the run's job list as one transaction.

        WATCH on the run's cursor makes the round apply exactly once: when a reply is lost (redis-py
        raises WatchError instead of retrying a watched transaction), the cursor, read again, says
        whether it went in. OOM aborts the whole transaction (EXECABORT), so a full Redis is waited
        out and the same round sent again. Returns the round's job ids (as the run lists them when
        the round had gone in already) and the run's progress read in the same round trip, for
        backpressure.
        """
        end = start + len(chunks)
        job_ids = [new_id() for _ in chunks]
        commands = jobs.enqueue_commands(self.settings, queue or self.settings.queue, chunks, job_ids, run.id, options,
                                         chunk_size=chunk_size, cursor_end=end)
        meta = keys.run_meta(run.id)
        cursor_key = keys.run_cursor(run.id)
        ttl = self.settings.result_ttl
        lost_replies = 0
        size = jobs.round_size(chunks)
        with self.connection.pipeline(transaction=True) as pipe:
            while True:
                if full.tight(adding=size):
                    full.wait()
                    continue
                # Not inside the try: WATCH is not yet watching, so redis-py retries a dead
                # connection itself and a Redis that stays down ends the enqueue here.
                pipe.watch(cursor_key)
                try:
                    cursor = int(pipe.get(cursor_key) or 0)
                    if jobs.check_cursor(run.id, cursor, start, end):  # applied already: only its reply was lost
                        # ...or its replica acks (QUEUEBERT_REPLICA_ACKS): an acknowledged write
                        # now stands for the round too (replicas apply writes in order).
                        pipe.expire(cursor_key, ttl)
                        enqueued, done = (int(v or 0) for v in pipe.hmget(meta, "enqueued", "done"))
                        listed = [j.decode() for j in pipe.lrange(keys.run_jobs(run.id), start, end - 1)]
                        log.info("round already applied", run=run.id, jobs=f"{start}..{end - 1}")
                        full.clear()
                        return (listed if len(listed) == len(job_ids) else job_ids), {"enqueued": enqueued, "done": done}
                    pipe.multi()
                    jobs.apply(commands, pipe)
                    replies = pipe.execute()
                except redis.exceptions.OutOfMemoryError:
                    full.wait()
                    continue
                except (redis.WatchError, redis.ConnectionError, redis.TimeoutError) as exc:
                    # The reply of a watched command was lost (or the cursor moved): look again,
                    # backing off (a failover takes seconds: the watched connection may keep
                    # landing on a demoted master until the sentinels and the pool agree).
                    lost_replies += 1
                    if lost_replies > self.LOST_REPLY_TRIES:
                        raise
                    if lost_replies == 1 or lost_replies % 10 == 0:
                        log.warning("enqueue round interrupted, checking whether it went in", run=run.id,
                                    error=str(exc), attempt=lost_replies)
                    time.sleep(min(0.05 * 2 ** (lost_replies - 1), 2.0))
                    continue
                finally:
                    pipe.reset()
                full.clear()
                enqueued, done = (int(v or 0) for v in replies[-1])
                return job_ids, {"enqueued": enqueued, "done": done}

    def _seal_waiting(self, run: Run, full: _FullWait) -> None:
        """Seal the run, waiting out a full Redis like the rounds do."""
        while True:
            try:
                self.seal(run.id, run.enqueued)
            except redis.exceptions.OutOfMemoryError:
                full.wait()
                continue
            full.clear()
            return

    def _resume_sealed(
        self, run: Run, source: Iterable[Item], total: int, jobs: int, chunk_size: int, keep_handles: bool,
        on_progress: Callable[[int], None] | None,
    ) -> Run:
        """A sealed run is complete: count the input (nothing is sent) and check it matches."""
        items = list(source) if keep_handles else None
        count = len(items) if items is not None else sum(1 for _ in source)
        if count != total:
            raise ResumeError(f"run {run.id} is complete with {total} items but this input has {count}: "
                              "it is not the input the run was started with")
        run.enqueued = run.skipped = total
        run.jobs = jobs
        if items is not None:
            self._skipped_handles(run, [[it["id"] for it in items[i:i + chunk_size]]
                                        for i in range(0, len(items), chunk_size)])
        if on_progress is not None:
            on_progress(total)
        log.info("run already complete: nothing to enqueue", run=run.id, items=total)
        return run

    def _skipped_handles(self, run: Run, skipped_ids: list[list[str]]) -> None:
        """Handles of items enqueued by an earlier call, from the run's job list."""
        job_ids = [j.decode() for j in self.connection.lrange(keys.run_jobs(run.id), 0, len(skipped_ids) - 1)]
        if len(job_ids) != len(skipped_ids):
            log.warning("the run's job list is gone: no handles for the items enqueued earlier", run=run.id)
            return
        for job_id, ids in zip(job_ids, skipped_ids):
            run.handles.extend(Handle(self, job_id, item_id, run.id) for item_id in ids)

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
        return jobs.parse_progress(self.connection.hmget(keys.run_meta(run_id), *jobs.PROGRESS_FIELDS))

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
        value = job_value(job_id, entries[-1][1])
        return value if item_id is None else pick_item(value, item_id)

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
        that is not yet safe elsewhere. ``timeout`` bounds the whole read, every wait included
        (TimeoutError), also a wait for jobs that a producer which died will never list.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        consumed: list[tuple[str, str | None]] = []

        def delete_consumed(final: bool = False) -> None:
            if consumed or final:
                if before_delete is not None:
                    before_delete()
                self._delete_consumed(run_id, consumed, final=final)
                consumed.clear()

        def idle() -> None:
            # Nothing arrived for a while: delete what was read now rather than at the next 256
            # jobs. On a Redis at maxmemory the results held here may be the very memory the
            # workers and the producer are waiting for.
            delete_consumed()
            if on_idle is not None:
                on_idle()

        entries = self.subscribe(run_id, timeout=timeout, on_idle=idle).entries()
        jobs_key = keys.run_jobs(run_id)
        arrived: dict[str, list[ItemResult]] = {}
        entry_ids: dict[str, str] = {}
        yielded: set[str] = set()  # a job id listed twice (a retried enqueue) is yielded once
        window: deque[str] = deque()
        position = 0  # index in the run's job list of the next job to yield
        while True:
            if not window:
                sealed = self.run_progress(run_id)["sealed"]
                window.extend(j.decode() for j in self.connection.lrange(jobs_key, position, position + 9_999))
                if not window:
                    if sealed:  # sealed is set after the last job id was listed
                        if consume:
                            delete_consumed(final=True)
                        return
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(f"run {run_id} not finished within {timeout} s: every job listed so "
                                           "far is read, and the run is not sealed (is its producer still running?)")
                    delete_consumed()  # the producer may be waiting for exactly this memory
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
                    delete_consumed()

    def _delete_consumed(self, run_id: str, consumed: list[tuple[str, str | None]], final: bool = False) -> None:
        queue = self.connection.hget(keys.run_meta(run_id), "queue")
        with self.connection.pipeline(transaction=False) as pipe:
            jobs.apply(jobs.delete_consumed_commands(run_id, queue, consumed), pipe)
            if final:
                # The run is over and read: its bookkeeping goes too, and the run is marked consumed
                # so that a late second completion (a frozen worker thawing) cannot reopen it.
                finish_consumed(self.connection, pipe, run_id)
            pipe.execute()
