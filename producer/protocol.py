"""The producer's protocol, written once: what ``Client`` and ``AsyncClient`` do in Redis, as steps
that do no I/O (generators of :mod:`producer.effects`).

Each client only carries effects out: ``Client`` on redis-py (``producer.client._SyncDriver``),
``AsyncClient`` on redis.asyncio (``producer.async_client._AsyncDriver``). The enqueue rounds,
resume, the waits for room and for a full Redis, the ordered and consuming reads and a
subscription's read are therefore the same code in both clients: a fix to any of them lands in
both. What a round writes is built by :mod:`producer.jobs`, as before; this module decides when
and in what order those commands go.

The effects cost no round trip of their own: each is exactly one Redis call (or pipeline) the
clients made before, and nothing here runs per item except the input's normalisation, which the
clients did per item too.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis
from rq.results import Result

from queuebert import keys
from queuebert.results import decode_entry, decode_rq_failure, decode_rq_return_value, finish_consumed
from queuebert.schema import Item, ItemResult, JobOptions, normalize_item
from queuebert.settings import ClientSettings, check_setting

from . import jobs
from .effects import (
    Call,
    Entry,
    Exec,
    NextChunk,
    Results,
    ScriptCall,
    Send,
    Sleep,
    Stepper,
    Steps,
    Unwatch,
    Watch,
    WatchedCall,
    next_output,
    notify,
)
from .jobs import JOBS_PER_ROUND_TRIP, Command, ResumeError, resume_hint

T = TypeVar("T")

#: Times an enqueue round is looked at again after its watched connection failed (backing off to
#: 2 s: about a minute in all) before the enqueue stops with a resumable error.
LOST_REPLY_TRIES = 35

#: Jobs of a run's job list read per LRANGE by an ordered read.
_JOB_LIST_PAGE = 10_000
#: Jobs an ordered, consuming read hands over before it deletes their results.
_DELETE_EVERY = 256


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
            f"stopped with {enqueued} items enqueued; {resume_hint(run_id)}"
        )
        self.run_id = run_id
        self.enqueued = enqueued


def consumed_message(run_id: str) -> str:
    """Why a run whose results a consuming read deleted cannot be enqueued or read again."""
    return f"run {run_id} was already read and its results deleted; use a new --run-id"


# -- results ---------------------------------------------------------------------------------------

def job_value(job_id: str, payload: dict[bytes, bytes]) -> list[ItemResult]:
    """A job's item results from its ``rq:results:<job>`` entry; JobFailed for a failed job."""
    value = decode_rq_return_value(payload)
    if value is None:
        raise JobFailed(f"job {job_id} failed: {decode_rq_failure(payload) or 'no result'}")
    return value


def pick_item(results: list[ItemResult], item_id: str, index: int | None = None) -> ItemResult | None:
    """The result of item ``item_id`` among its job's (at ``index`` when known: ids given by callers
    may repeat within a job)."""
    if index is not None and index < len(results) and results[index].get("id") == item_id:
        return results[index]
    for result in results:
        if result.get("id") == item_id:
            return result
    return None


def fresh_run_commands(settings: ClientSettings, queue: str, chunks: Sequence[list[Item]], run_id: str,
                       options: JobOptions) -> tuple[list[str], list[Command]]:
    """Job ids and the writes of ``chunks`` as the jobs of a new run, sealed in the same round
    trip (``submit``, and a coalesced batch): one pipeline, no cursor (nothing to resume)."""
    job_ids = [jobs.new_id() for _ in chunks]
    commands = jobs.enqueue_commands(settings, queue, chunks, job_ids, run_id, options)
    commands += jobs.seal_commands(settings, run_id, sum(len(c) for c in chunks))
    return job_ids, commands


def fit_block_ms(connection: Any, block_ms: int) -> int:
    """``block_ms`` for a blocking read (XREAD BLOCK) on ``connection``, shortened to half its
    socket timeout: a read that blocks as long as the socket waits would fail as a timeout every
    time nothing arrives, and reconnect."""
    socket_timeout = connection.connection_pool.connection_kwargs.get("socket_timeout")
    if socket_timeout:
        return min(block_ms, max(1, int(socket_timeout * 500)))
    return block_ms


def maxmemory_text(info: dict[str, Any]) -> str:
    return str(info.get("maxmemory_human") or info.get("maxmemory") or "?")


# -- what both clients' handles, runs and subscriptions hold --------------------------------------

@dataclass
class HandleRecord:
    """What ``Handle`` and ``AsyncHandle`` hold: where one submitted item's result will appear."""

    client: Any
    job_id: str
    item_id: str
    run_id: str | None = None
    #: The item's position among its job's items (ids given by callers may repeat within a job).
    index: int | None = None

    def pick(self, results: list[ItemResult] | None) -> ItemResult | None:
        """This item's result among its job's."""
        return None if results is None else pick_item(results, self.item_id, self.index)


@dataclass
class RunRecord:
    """What ``Run`` and ``AsyncRun`` hold: a set of items enqueued together; the steps keep its
    counts here as they go."""

    client: Any
    id: str
    enqueued: int = 0
    jobs: int = 0
    handles: list[Any] = field(default_factory=list)
    #: Items an earlier, interrupted enqueue of this run had already sent (resume); counted in
    #: ``enqueued`` too.
    skipped: int = 0
    #: The queue its jobs went to (a resumed run keeps the one it was started on).
    queue: str | None = None

    @staticmethod
    def finished(progress: dict[str, int]) -> bool:
        """Whether a run with this progress has every item's result."""
        return bool(progress["sealed"]) and progress["done"] >= progress["total"]


# -- waiting for a full Redis ---------------------------------------------------------------------

class FullWait:
    """Waiting for a full (or nearly full, see :meth:`tight`) Redis: exponential backoff, a deadline
    per spell, and one log line per minute at most (a stream that Redis's memory paces waits
    briefly before nearly every round; it says so once, not each time)."""

    #: Seconds between two "Redis is full" lines.
    LOG_EVERY = 60.0
    #: Seconds a Redis without ``maxmemory`` (or with INFO disabled) goes unasked again.
    LIMIT_RECHECK = 5.0

    def __init__(self, settings: ClientSettings, run: RunRecord, log: Any):
        self.settings = settings
        self.run = run
        self.log = log
        self.since: float | None = None
        self.delay = 0.05
        self.maxmemory = "?"
        self._limit: int | None = None  # maxmemory in bytes, 0: none
        self._limit_checked = 0.0
        self._logged_at: float | None = None

    def wait(self) -> Steps[None]:
        """Sleep before the next try; RedisFull once the spell has lasted ``redis_full_timeout``."""
        now = time.monotonic()
        if self._start(now):
            # INFO rather than CONFIG GET, which managed Redis services often disable.
            try:
                self.maxmemory = maxmemory_text((yield Call(Command("info", ("memory",)))))
            except redis.RedisError:
                self.maxmemory = "?"
            self.log.warning(f"Redis is full (maxmemory {self.maxmemory}): waiting for results to be consumed",
                             run=self.run.id, enqueued=self.run.enqueued,
                             give_up_after_s=self.settings.redis_full_timeout)
        yield Sleep(self._sleep_for(now))

    def tight(self, adding: int = 0) -> Steps[bool]:
        """Whether ``adding`` more bytes would bring Redis within ``redis_headroom`` of its
        ``maxmemory``: then the stream waits before sending them, as it does at OOM. One
        ``INFO memory`` per round while a limit is set; without one (looked for again every few
        seconds) it costs nothing."""
        now = time.monotonic()
        if self.settings.redis_headroom <= 0 or (self._limit == 0 and now - self._limit_checked < self.LIMIT_RECHECK):
            return False
        try:
            info = yield Call(Command("info", ("memory",)))
        except redis.ResponseError:  # INFO disabled (some managed services): rely on OOM alone
            self._limit, self._limit_checked = 0, now
            return False
        self._limit, self._limit_checked = int(info.get("maxmemory", 0) or 0), now
        return bool(self._limit) and int(info.get("used_memory", 0)) + adding > \
            (1 - self.settings.redis_headroom) * self._limit

    def clear(self) -> None:
        if self.since is not None:
            self.log.debug("Redis has room again", run=self.run.id, waited_s=round(time.monotonic() - self.since, 1))
            self.since = None

    def _start(self, now: float) -> bool:
        """Called before each wait: True when a new spell is to be logged."""
        if self.since is None:
            self.since, self.delay = now, 0.05
            if self._logged_at is None or now - self._logged_at >= self.LOG_EVERY:
                self._logged_at = now
                return True
        return False

    def _sleep_for(self, now: float) -> float:
        assert self.since is not None
        timeout = self.settings.redis_full_timeout
        waited = now - self.since
        if waited >= timeout:
            raise RedisFull(self.run.id, self.run.enqueued, self.maxmemory, waited)
        seconds = min(self.delay, timeout - waited)
        self.delay = min(self.delay * 2, 2.0)
        return seconds


# -- reading a run's stream -----------------------------------------------------------------------

class SubscriptionRecord:
    """Where a read of a run's stream stands (``Subscription``, ``AsyncSubscription``).

    ``last_id`` is the stream id of the last entry handed over whole: a subscriber that reconnects
    passes it back (``client.subscribe(run_id, last_id=...)``) and misses nothing. Iterating item
    results, it moves as the last result of an entry is handed over (:meth:`handed_over`), so a
    reader that stops between two entries (cancelled while waiting, say) resumes exactly; one that
    stops inside an entry gets that entry's results again rather than losing its rest. Whole
    entries (``entries()``) move it as each is handed over. The read ends when the run is sealed
    and its last item is done.
    """

    def __init__(
        self, client: Any, run_id: str, last_id: str = "0-0", block_ms: int = 1000, timeout: float | None = None,
        on_idle: Callable[[], Any] | None = None,
    ):
        self.client = client
        self.run_id = run_id
        self.last_id = last_id
        self.block_ms = block_ms
        self.timeout = timeout
        #: Called whenever a read comes back empty (awaited by ``AsyncSubscription`` when it returns
        #: an awaitable): lets a caller check its workers are alive.
        self.on_idle = on_idle
        self.seen_jobs: set[str] = set()

    def read_steps(self) -> Steps[None]:
        """The read, as steps for the client's driver (outputs :class:`Entry`)."""
        return self.client._protocol.read_stream(
            self, fit_block_ms(self.client.connection, self.block_ms), self.timeout,
            on_idle=lambda: notify(self.on_idle))

    def handed_over(self, entry: Entry) -> Iterator[ItemResult]:
        """``entry``'s item results, ``last_id`` moving to it with the last of them."""
        if not entry.results:
            self.last_id = entry.entry_id
        for n, result in enumerate(entry.results):
            if n == len(entry.results) - 1:
                self.last_id = entry.entry_id
            yield result


@dataclass
class _Reader:
    run_id: str
    last_id: str = "0-0"
    seen_jobs: set[str] = field(default_factory=set)


#: ``last_id`` meaning "after the entries already in the stream", resolved at the first read
#: (not XREAD's ``$``, which would skip what arrives between two reads).
TAIL = "tail"


@dataclass(frozen=True)
class ProducerProtocol(Generic[T]):
    """The steps of one client. ``handle`` makes the client's handle of an item
    (``handle(job_id, item_id, run_id, index)``); ``log`` is the client's logger, so events keep
    its module's name."""

    settings: ClientSettings
    log: Any
    handle: Callable[[str, str, str, int], T]

    # -- small reads and writes -------------------------------------------------------------------

    def run_progress(self, run_id: str) -> Steps[dict[str, int]]:
        """The run's counters, and ``consumed``: 1 once a consuming read finished it (or its
        handles were released): its results and job list are gone, so reading it again yields
        nothing, and enqueueing into it would wait forever (completions never reopen it)."""
        raw = yield Call(Command("hmget", (keys.run_meta(run_id), *jobs.PROGRESS_FIELDS, "consumed")))
        progress = jobs.parse_progress(raw[:-1])
        progress["consumed"] = int(raw[-1] or 0)
        return progress

    def latest_result(self, job_id: str) -> Steps[list[ItemResult] | None]:
        """A job's item results if it has finished (RQ's result stream), without waiting."""
        entries = yield Call(Command("xrevrange", (Result.get_key(job_id), "+", "-"), {"count": 1}))
        return job_value(job_id, entries[-1][1]) if entries else None

    def seal(self, run_id: str, total: int | None = None) -> Steps[int]:
        """Mark the run complete on the producer side: ``total`` is now final.

        The producer passes the count it enqueued itself: a pipeline retried across a Redis
        restart may have bumped the ``enqueued`` counter twice, but the producer's own tally is exact.
        """
        if total is None:
            total = int((yield Call(Command("hget", (keys.run_meta(run_id), "enqueued")))) or 0)
        yield Send(jobs.seal_commands(self.settings, run_id, total))
        return total

    def stream_tail(self, run_id: str) -> Steps[str]:
        """The id of the run stream's newest entry ("0-0" for none)."""
        last = yield Call(Command("xrevrange", (keys.run_stream(run_id), "+", "-"), {"count": 1}))
        return last[0][0].decode() if last else "0-0"

    # -- enqueueing a stream ----------------------------------------------------------------------

    def enqueue_stream(
        self, run: RunRecord, source: Any, *, chunk_size: int | None, max_pending: int | None, queue: str | None,
        options: JobOptions, on_progress: Callable[[int], Any] | None, keep_handles: bool,
        job_settings: ClientSettings | None = None,
    ) -> Steps[RunRecord]:
        """Enqueue the values of ``source`` as run ``run`` in checked rounds of
        ``JOBS_PER_ROUND_TRIP`` jobs, resuming where an earlier call stopped (see
        ``Client.enqueue_stream``). ``job_settings``: the settings the jobs are written with (a
        run's own ``job_ttl``), else the client's."""
        # Checked here, before anything is sent, as the settings check theirs: a chunk size of 0
        # or less broke the first round, and a negative max_pending waited forever for room.
        check_setting(ClientSettings, "chunk_size", chunk_size)
        check_setting(ClientSettings, "max_pending", max_pending)
        raw_cursor, stored, consumed = yield Send([Command("get", (keys.run_cursor(run.id),)),
                                                   Command("hmget", (keys.run_meta(run.id), *jobs.RESUME_FIELDS)),
                                                   Command("hget", (keys.run_meta(run.id), "consumed"))])
        if consumed:
            # Its results were read and deleted: a resumed enqueue would find nothing to send (a
            # sealed run) or send jobs whose completions the consumed run never records again.
            raise ResumeError(consumed_message(run.id))
        plan = jobs.resume_plan(self.settings, run.id, raw_cursor, stored, chunk_size, queue, self.log)
        size, queue, resume_from = plan.chunk_size, plan.queue, plan.resume_from
        run.queue = queue or self.settings.queue
        max_pending = self.settings.max_pending if max_pending is None else max_pending
        counter = itertools.count()

        def read() -> Steps[list[Item]]:
            """The next chunk; items without an id get their input position, so a resumed read
            gives them the same ids."""
            values = yield NextChunk(source, size)
            return [normalize_item(value, f"{next(counter)}") for value in values]

        if plan.sealed:
            return (yield from self._resume_sealed(run, read, size, plan, keep_handles, on_progress))

        full = FullWait(self.settings, run, self.log)
        batch: list[list[Item]] = []
        position = 0  # chunks built so far = index in the run's job list of the next chunk
        skipped_ids: list[list[str]] = []  # with keep_handles: item ids of the chunks skipped

        def skipping_done() -> Steps[None]:
            if run.skipped:
                if keep_handles:
                    yield from self._skipped_handles(run, skipped_ids)
                yield from notify(on_progress, run.skipped)
                self.log.info("skipped what was already enqueued", run=run.id, items=run.skipped, jobs=run.jobs)

        def flush() -> Steps[None]:
            start = position - len(batch)
            job_ids, progress = yield from self._enqueue_round(batch, run, start, size, options, queue, full,
                                                               job_settings or self.settings)
            for job_id, items in zip(job_ids, batch):
                if keep_handles:
                    run.handles.extend(self.handle(job_id, it["id"], run.id, n) for n, it in enumerate(items))
                run.enqueued += len(items)
            run.jobs += len(job_ids)
            yield from notify(on_progress, sum(len(c) for c in batch))
            batch.clear()
            if max_pending:
                yield from self._wait_for_room(run.id, progress, max_pending)

        try:
            while True:
                items = yield from read()
                if items:
                    position += 1
                    if position <= resume_from:
                        run.skipped += len(items)
                        run.enqueued += len(items)
                        run.jobs += 1
                        if keep_handles:
                            skipped_ids.append([it["id"] for it in items])
                    else:
                        if position == resume_from + 1:
                            yield from skipping_done()
                        batch.append(items)
                        if len(batch) >= JOBS_PER_ROUND_TRIP:
                            yield from flush()
                if len(items) < size:  # the input has ended
                    break
            if position < resume_from:
                raise ResumeError(f"run {run.id} already lists {resume_from} jobs but this input makes only "
                                  f"{position} of {size} items: it is not the input the run was started with")
            if position == resume_from:
                yield from skipping_done()
            if batch:
                yield from flush()
            yield from self._seal_waiting(run, full)
        except (RedisFull, ResumeError):
            raise
        except BaseException as exc:  # Ctrl-C, cancelled, a lost connection, an unreadable input line
            exc.add_note(f"run {run.id}: {run.enqueued} items enqueued; {resume_hint(run.id)}")
            raise
        self.log.debug("run enqueued", run=run.id, items=run.enqueued, jobs=run.jobs, skipped=run.skipped)
        return run

    def _enqueue_round(
        self, chunks: list[list[Item]], run: RunRecord, start: int, chunk_size: int, options: JobOptions,
        queue: str | None, full: FullWait, job_settings: ClientSettings,
    ) -> Steps[tuple[list[str], dict[str, int]]]:
        """Enqueue the jobs at positions ``start ..`` of the run's job list as one transaction.

        WATCH on the run's cursor makes the round apply exactly once: when a reply is lost (redis-py
        raises WatchError instead of retrying a watched transaction), the cursor, read again, says
        whether it went in. OOM aborts the whole transaction (EXECABORT), so a full Redis is waited
        out and the same round sent again. Returns the round's job ids (as the run lists them when
        the round had gone in already) and the run's progress read in the same round trip, for
        backpressure.
        """
        end = start + len(chunks)
        job_ids = [jobs.new_id() for _ in chunks]
        commands = jobs.enqueue_commands(job_settings, queue or self.settings.queue, chunks, job_ids, run.id, options,
                                         chunk_size=chunk_size, cursor_end=end)
        meta = keys.run_meta(run.id)
        cursor_key = keys.run_cursor(run.id)
        ttl = self.settings.result_ttl
        lost_replies = 0
        size = jobs.round_size(chunks)
        while True:
            if (yield from full.tight(adding=size)):
                yield from full.wait()
                continue
            # Not inside the try: WATCH is not yet watching, so redis-py retries a dead
            # connection itself and a Redis that stays down ends the enqueue here.
            yield Watch(cursor_key)
            try:
                cursor = int((yield WatchedCall(Command("get", (cursor_key,)))) or 0)
                if jobs.check_cursor(run.id, cursor, start, end):  # applied already: only its reply was lost
                    # ...or its replica acks (QUEUEBERT_REPLICA_ACKS): an acknowledged write
                    # now stands for the round too (replicas apply writes in order).
                    yield WatchedCall(Command("expire", (cursor_key, ttl)))
                    raw = yield WatchedCall(Command("hmget", (meta, "enqueued", "done")))
                    listed = [j.decode() for j in (yield WatchedCall(Command("lrange", (keys.run_jobs(run.id), start,
                                                                                         end - 1))))]
                    yield Unwatch()
                    self.log.info("round already applied", run=run.id, jobs=f"{start}..{end - 1}")
                    full.clear()
                    enqueued, done = (int(v or 0) for v in raw)
                    return (listed if len(listed) == len(job_ids) else job_ids), {"enqueued": enqueued, "done": done}
                replies = yield Exec(commands)
            except redis.exceptions.OutOfMemoryError:
                yield from full.wait()
                continue
            except (redis.WatchError, redis.ConnectionError, redis.TimeoutError) as exc:
                # The reply of a watched command was lost (or the cursor moved): look again,
                # backing off (a failover takes seconds: the watched connection may keep
                # landing on a demoted master until the sentinels and the pool agree).
                lost_replies += 1
                if lost_replies > LOST_REPLY_TRIES:
                    raise
                if lost_replies == 1 or lost_replies % 10 == 0:
                    self.log.warning("enqueue round interrupted, checking whether it went in", run=run.id,
                                     error=str(exc), attempt=lost_replies)
                yield Sleep(min(0.05 * 2 ** (lost_replies - 1), 2.0))
                continue
            full.clear()
            enqueued, done = (int(v or 0) for v in replies[-1])
            return job_ids, {"enqueued": enqueued, "done": done}

    def _seal_waiting(self, run: RunRecord, full: FullWait) -> Steps[None]:
        """Seal the run, waiting out a full Redis like the rounds do."""
        while True:
            try:
                yield from self.seal(run.id, run.enqueued)
            except redis.exceptions.OutOfMemoryError:
                yield from full.wait()
                continue
            full.clear()
            return

    def _resume_sealed(
        self, run: RunRecord, read: Callable[[], Steps[list[Item]]], chunk_size: int, plan: jobs.ResumePlan,
        keep_handles: bool, on_progress: Callable[[int], Any] | None,
    ) -> Steps[RunRecord]:
        """A sealed run is complete: count the input (nothing is sent) and check it matches."""
        count = 0
        ids: list[list[str]] = []
        while True:
            items = yield from read()
            count += len(items)
            if keep_handles and items:
                ids.append([it["id"] for it in items])
            if len(items) < chunk_size:
                break
        if count != plan.total:
            raise ResumeError(f"run {run.id} is complete with {plan.total} items but this input has {count}: "
                              "it is not the input the run was started with")
        run.enqueued = run.skipped = plan.total
        run.jobs = plan.listed
        if keep_handles:
            yield from self._skipped_handles(run, ids)
        yield from notify(on_progress, plan.total)
        self.log.info("run already complete: nothing to enqueue", run=run.id, items=plan.total)
        return run

    def _skipped_handles(self, run: RunRecord, skipped_ids: list[list[str]]) -> Steps[None]:
        """Handles of items enqueued by an earlier call, from the run's job list."""
        raw = yield Call(Command("lrange", (keys.run_jobs(run.id), 0, len(skipped_ids) - 1)))
        job_ids = [j.decode() for j in raw]
        if len(job_ids) != len(skipped_ids):
            self.log.warning("the run's job list is gone: no handles for the items enqueued earlier", run=run.id)
            return
        for job_id, item_ids in zip(job_ids, skipped_ids):
            run.handles.extend(self.handle(job_id, item_id, run.id, n) for n, item_id in enumerate(item_ids))

    def _wait_for_room(self, run_id: str, progress: dict[str, int], max_pending: int) -> Steps[None]:
        pending = progress["enqueued"] - progress["done"]
        # Short polls: a long sleep here lets the workers drain the queue and then idle.
        delay = 0.002
        while pending > max_pending:
            yield Sleep(delay)
            delay = min(delay * 2, 0.05)
            raw = yield Call(Command("hmget", (keys.run_meta(run_id), "enqueued", "done")))
            enqueued, done = (int(v or 0) for v in raw)
            pending = enqueued - done

    # -- reading results --------------------------------------------------------------------------

    def read_stream(
        self, reader: SubscriptionRecord | _Reader, block_ms: int, timeout: float | None,
        on_idle: Callable[[], Steps[None]] | None = None,
    ) -> Steps[None]:
        """The run stream's entries from ``reader.last_id`` on, each job once (outputs
        :class:`Entry`), until the run is sealed and its last item is done. ``reader.last_id``
        moves here only past entries not handed over (a job seen already; :data:`TAIL`): the
        caller moves it as it hands entries over. ``on_idle`` runs whenever a read comes back empty."""
        stream = keys.run_stream(reader.run_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        if reader.last_id == TAIL:
            reader.last_id = yield from self.stream_tail(reader.run_id)
        cursor = reader.last_id
        while True:
            reply = yield Call(Command("xread", ({stream: cursor},), {"count": 500, "block": block_ms}))
            got = False
            for _name, entries in reply or []:
                for entry_id, fields in entries:
                    got = True
                    cursor = entry_id.decode()
                    job_id, results = decode_entry(fields)
                    # The completion script writes each job once; this guards a subscriber that
                    # resumes from an older id it had partly consumed.
                    if job_id in reader.seen_jobs:
                        reader.last_id = cursor  # everything before it was handed over already
                        continue
                    reader.seen_jobs.add(job_id)
                    yield Entry(cursor, job_id, results)
            if got:
                continue
            if on_idle is not None:
                yield from on_idle()
            # Nothing new: the run is over only if it is sealed and its done count says all
            # entries were written (the script counts and appends atomically).
            p = yield from self.run_progress(reader.run_id)
            if p["sealed"] and p["done"] >= p["total"] and \
                    not (yield Call(Command("xread", ({stream: cursor},), {"count": 1}))):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {reader.run_id} not finished within {timeout} s")

    def ordered_results(
        self, run_id: str, *, block_ms: int, timeout: float | None, consume: bool,
        on_idle: Callable[..., Any] | None, before_delete: Callable[..., Any] | None,
    ) -> Steps[None]:
        """The run's item results in input order (outputs :class:`Results`, one job's at a time),
        each job's as soon as all before it are in.

        Reads the run's stream once and its job list in order; memory holds only the results
        that arrived ahead of their turn. With ``consume`` the results of each job are deleted
        from Redis (stream entry, RQ result, job hash) once the caller has taken them (the step
        is resumed after its output); ``before_delete`` (a file's flush, say) runs before each
        deletion, so nothing is deleted that is not yet safe elsewhere. ``timeout`` bounds the
        whole read, every wait included (TimeoutError), also a wait for jobs that a producer
        which died will never list.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        consumed: list[tuple[str, str | None]] = []

        def delete_consumed(final: bool = False) -> Steps[None]:
            if consumed or final:
                yield from notify(before_delete)
                yield from self._delete_consumed(run_id, consumed, final=final)
                consumed.clear()

        def idle() -> Steps[None]:
            # Nothing arrived for a while: delete what was read now rather than at the next 256
            # jobs. On a Redis at maxmemory the results held here may be the very memory the
            # workers and the producer are waiting for.
            yield from delete_consumed()
            yield from notify(on_idle)

        entries = Stepper(self.read_stream(_Reader(run_id), block_ms, timeout, on_idle=idle))
        jobs_key = keys.run_jobs(run_id)
        arrived: dict[str, list[ItemResult]] = {}
        entry_ids: dict[str, str] = {}
        yielded: set[str] = set()  # a job id listed twice (a retried enqueue) is yielded once
        window: deque[str] = deque()
        position = 0  # index in the run's job list of the next job to yield
        try:
            while True:
                if not window:
                    sealed = (yield from self.run_progress(run_id))["sealed"]
                    listed = yield Call(Command("lrange", (jobs_key, position, position + _JOB_LIST_PAGE - 1)))
                    window.extend(j.decode() for j in listed)
                    if not window:
                        if sealed:  # sealed is set after the last job id was listed
                            if consume:
                                yield from delete_consumed(final=True)
                            return
                        if deadline is not None and time.monotonic() >= deadline:
                            raise TimeoutError(f"run {run_id} not finished within {timeout} s: every job listed "
                                               "so far is read, and the run is not sealed (is its producer still "
                                               "running?)")
                        yield from delete_consumed()  # the producer may be waiting for exactly this memory
                        yield Sleep(0.05)  # the producer is still enqueueing
                        continue
                job_id = window.popleft()
                position += 1
                if job_id in yielded:
                    continue
                while job_id not in arrived:
                    entry = yield from next_output(entries)
                    if entry is None:
                        # The run finished but this job's entry is gone (its stream expired or was
                        # trimmed): fall back to RQ's own result for it.
                        arrived[job_id] = (yield from self.latest_result(job_id)) or []
                        break
                    arrived[entry.job_id] = entry.results
                    entry_ids[entry.job_id] = entry.entry_id
                yielded.add(job_id)
                yield Results(arrived.pop(job_id))
                if consume:
                    # Only after the caller took them (resumed): nothing is deleted unread.
                    consumed.append((job_id, entry_ids.pop(job_id, None)))
                    if len(consumed) >= _DELETE_EVERY:
                        yield from delete_consumed()
        finally:
            entries.steps.close()

    def _delete_consumed(self, run_id: str, consumed: Iterable[tuple[str, str | None]],
                         final: bool = False) -> Steps[None]:
        queue = yield Call(Command("hget", (keys.run_meta(run_id), "queue")))
        commands: list[Command | ScriptCall] = list(jobs.delete_consumed_commands(run_id, queue, list(consumed)))
        if final:
            # The run is over and read: its bookkeeping goes too, and the run is marked consumed
            # so that a late second completion (a frozen worker thawing) cannot reopen it.
            commands.append(ScriptCall(finish_consumed, (run_id,)))
        yield Send(commands)
