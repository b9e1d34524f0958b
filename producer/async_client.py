"""The asyncio client: :class:`~producer.client.Client`'s operations on redis.asyncio, for web services.

The jobs and run bookkeeping it writes are built by :mod:`producer.jobs`, as the synchronous
client's are, so they are byte for byte the same. Two things are its own, because an event loop
serving many small requests needs them:

- **Coalescing.** Concurrent :meth:`AsyncClient.submit` calls are gathered into shared jobs of up
  to ``chunk_size`` items (one run per gathered batch), each item keeping its own handle: a
  one-text job costs Redis about 40 times what a text in a full job costs. The window is
  ``coalesce_ms``, or longer while a job sent now would only wait (see :class:`_Coalescer`).
- **One reader for every waiting result.** ``await handle.result()`` registers a future with the
  client's result listener, one task that XREADs the RQ result streams of all awaited jobs in one
  blocking call on one connection; a newly awaited job interrupts that call (``CLIENT UNBLOCK``)
  so that it is read at once. A thousand waiters cost one connection, not a thousand.

One client belongs to one event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import sys
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio
import structlog
from rq import Queue, worker_registration
from rq.job import Job
from rq.results import Result

from queuebert import keys
from queuebert.connection import connect_async, resolve_url
from queuebert.results import decode_entry, finish_consumed, forget_run
from queuebert.schema import DEFAULT_HYPOTHESIS_TEMPLATE, Item, ItemResult, normalize_item
from queuebert.settings import ClientSettings

from . import jobs, pairs
from .client import FullWaitState, JobFailed, RedisFull, job_value, maxmemory_text, pick_item
from .jobs import JOBS_PER_ROUND_TRIP, JobOptions, ResumeError, new_id, resume_hint

log = structlog.get_logger(__name__)

__all__ = ["AsyncClient", "AsyncHandle", "AsyncRun", "AsyncSubscription"]


class _Setting(enum.Enum):
    """A keyword left to the client's settings (where None already means "none")."""

    SETTING = "setting"


#: ``enqueue_stream(job_ttl=SETTING)``: the jobs' deadline is ``ClientSettings.job_ttl``.
SETTING = _Setting.SETTING


@dataclass(eq=False)
class _RunClaim:
    """The jobs of one run made by ``submit``/``submit_many`` whose handles are not all released."""

    run_id: str
    jobs: int


@dataclass(eq=False)
class _JobClaim:
    """What the handles of one job made by this client share: how many of them are not yet
    released (:meth:`AsyncClient.release`). Held by the handles only, so a caller that never
    releases leaves nothing behind in the client."""

    job_id: str
    queue: str
    holders: int
    run: _RunClaim


@dataclass
class AsyncHandle:
    """One submitted item: where its result will appear."""

    client: AsyncClient
    job_id: str
    item_id: str
    run_id: str | None = None
    #: The item's position among its job's items (ids given by callers may repeat within a job).
    index: int | None = None
    #: Shared with the other handles of its job (``submit``, ``submit_many``); None: not releasable.
    _claim: _JobClaim | None = field(default=None, repr=False, compare=False)
    _released: bool = field(default=False, repr=False, compare=False)

    async def result(self, timeout: float | None = 0) -> ItemResult | None:
        """The item's result; waits up to ``timeout`` seconds (None: forever, 0: just look).
        Raises :class:`JobFailed` if its job failed as a whole."""
        results = await self.client.job_results(self.job_id, timeout=timeout)
        return None if results is None else pick_item(results, self.item_id, self.index)  # type: ignore[arg-type]


@dataclass
class AsyncRun:
    """A set of items enqueued together (``enqueue_stream``); as :class:`producer.client.Run`."""

    client: AsyncClient
    id: str
    enqueued: int = 0
    jobs: int = 0
    handles: list[AsyncHandle] = field(default_factory=list)
    #: Items an earlier, interrupted enqueue of this run had already sent (resume).
    skipped: int = 0
    #: The queue its jobs went to (a resumed run keeps the one it was started on).
    queue: str | None = None

    async def progress(self) -> dict[str, int]:
        return await self.client.run_progress(self.id)

    async def is_done(self) -> bool:
        p = await self.progress()
        return bool(p["sealed"]) and p["done"] >= p["total"]

    async def wait(self, timeout: float | None = None, poll: float = 0.05) -> bool:
        """Wait until every item has a result; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not await self.is_done():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll)
        return True

    def results(self, timeout: float | None = None, consume: bool = False) -> AsyncIterator[ItemResult]:
        return self.client.ordered_results(self.id, timeout=timeout, consume=consume)

    def subscribe(self, from_start: bool = True) -> AsyncSubscription:
        return self.client.subscribe(self.id, from_start=from_start)


class AsyncSubscription:
    """Item results of a run as their jobs complete, read from the run's stream (``async for``).

    ``last_id`` is the stream id of the last entry handed over whole: a subscriber that reconnects
    passes it back (``client.subscribe(run_id, last_id=...)``) and misses nothing. Iterating item
    results, it moves as the last result of an entry is yielded, so a reader that stops between
    two entries (cancelled while waiting, say) resumes exactly; one that stops inside an entry gets
    that entry's results again rather than losing its rest. :meth:`entries` hands over whole
    entries. Iteration ends when the run is sealed and its last item is done.
    """

    #: ``last_id`` meaning "after the entries already in the stream", resolved at the first read
    #: (not XREAD's ``$``, which would skip what arrives between two reads).
    TAIL = "tail"

    def __init__(
        self, client: AsyncClient, run_id: str, last_id: str = "0-0", block_ms: int = 1000,
        timeout: float | None = None, on_idle: Callable[[], Any] | None = None,
    ):
        self.client = client
        self.run_id = run_id
        self.last_id = last_id
        self.block_ms = block_ms
        self.timeout = timeout
        #: Called (awaited if it returns an awaitable) whenever a read comes back empty.
        self.on_idle = on_idle
        self._seen_jobs: set[str] = set()

    async def _read(self) -> AsyncIterator[tuple[str, str, list[ItemResult]]]:
        conn = self.client.connection
        stream = keys.run_stream(self.run_id)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        if self.last_id == self.TAIL:
            last = await conn.xrevrange(stream, "+", "-", count=1)
            self.last_id = last[0][0].decode() if last else "0-0"
        cursor = self.last_id
        while True:
            reply = await conn.xread({stream: cursor}, count=500, block=fit_block_ms(conn, self.block_ms))
            got = False
            for _name, entries in reply or []:
                for entry_id, fields in entries:
                    got = True
                    cursor = entry_id.decode()
                    job_id, results = decode_entry(fields)
                    # The completion script writes each job once; this guards a subscriber that
                    # resumes from an older id it had partly consumed.
                    if job_id in self._seen_jobs:
                        self.last_id = cursor  # everything before it was handed over already
                        continue
                    self._seen_jobs.add(job_id)
                    yield cursor, job_id, results
            if got:
                continue
            if self.on_idle is not None:
                await _maybe_await(self.on_idle())
            # Nothing new: the run is over only if it is sealed and its done count says all
            # entries were written (the script counts and appends atomically).
            p = await self.client.run_progress(self.run_id)
            if p["sealed"] and p["done"] >= p["total"] and not await conn.xread({stream: cursor}, count=1):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {self.run_id} not finished within {self.timeout} s")

    async def entries(self) -> AsyncIterator[tuple[str, str, list[ItemResult]]]:
        """``(stream_id, job_id, results)`` per completed job, each job once."""
        async for entry_id, job_id, results in self._read():
            self.last_id = entry_id
            yield entry_id, job_id, results

    async def _items(self) -> AsyncIterator[ItemResult]:
        async for entry_id, _job_id, results in self._read():
            if not results:
                self.last_id = entry_id
            for n, result in enumerate(results):
                if n == len(results) - 1:
                    self.last_id = entry_id
                yield result

    def __aiter__(self) -> AsyncIterator[ItemResult]:
        return self._items()


def fit_block_ms(connection: Any, block_ms: int) -> int:
    """``block_ms`` for a blocking read (XREAD BLOCK) on ``connection``, shortened to half its
    socket timeout: a read that blocks as long as the socket waits would fail as a timeout every
    time nothing arrives, and reconnect."""
    socket_timeout = connection.connection_pool.connection_kwargs.get("socket_timeout")
    if socket_timeout:
        return min(block_ms, max(1, int(socket_timeout * 500)))
    return block_ms


async def _maybe_await(value: Any) -> Any:
    return await value if isinstance(value, Awaitable) else value


async def _aiterate(iterable: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(iterable, AsyncIterable):
        async for value in iterable:
            yield value
    else:
        for value in iterable:
            yield value


class _AsyncFullWait(FullWaitState):
    """:class:`~producer.client.FullWaitState` on a redis.asyncio connection."""

    def __init__(self, client: AsyncClient, run: AsyncRun):
        super().__init__(client.settings, run)
        self.client = client

    async def wait(self) -> None:
        now = time.monotonic()
        if self.start(now):
            try:
                maxmemory = maxmemory_text(await self.client.connection.info("memory"))
            except redis.RedisError:
                maxmemory = "?"
            self.log_full(maxmemory)
        await asyncio.sleep(self.sleep_for(now))

    async def tight(self, adding: int = 0) -> bool:
        now = time.monotonic()
        if not self.needs_info(now):
            return False
        try:
            info = await self.client.connection.info("memory")
        except redis.ResponseError:  # INFO disabled (some managed services): rely on OOM alone
            info = None
        return self.tight_from(info, adding, now)


#: A job's outcome as the listener hands it to its waiters: the item results, or the failure.
_Outcome = tuple[list[ItemResult] | None, str | None]


class _ResultListener:
    """One task that XREADs the RQ result streams of every awaited job at once and resolves the
    waiters' futures.

    It reads each stream from its start, so a result written before its waiter registered is
    found on the first read. While nobody waits it sends nothing. A job newly awaited while the
    XREAD blocks interrupts it with ``CLIENT UNBLOCK`` from another connection; where that command
    is refused (some managed services), the XREAD blocks only ``POLL_MS`` instead. A lost
    connection is reconnected with backoff, waiters keep waiting through it.
    """

    #: Longest block of the shared XREAD (an idle cycle costs one command per this long).
    BLOCK_MS = 1000
    #: Block when CLIENT UNBLOCK is refused: how late a newly awaited job may be read.
    POLL_MS = 20
    #: Tries of CLIENT UNBLOCK while the XREAD it targets is still on its way to Redis.
    UNBLOCK_TRIES = 50

    def __init__(self, client: AsyncClient):
        self.client = client
        self.waiters: dict[str, set[asyncio.Future[_Outcome]]] = {}
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.reading: set[str] = set()  # job ids of the XREAD in flight
        self.in_xread = False
        self.cycle = 0
        self.conn: redis.asyncio.Redis | None = None
        self.conn_id: int | None = None
        self.can_unblock = True
        self.closed = False
        self._unblocking: int | None = None  # the cycle an UNBLOCK is under way for
        #: XREAD calls made (tests and benchmarks read it).
        self.reads = 0

    async def wait(self, job_id: str, timeout: float | None) -> _Outcome | None:
        self._ensure_running()
        fut: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(job_id, set()).add(fut)
        if job_id not in self.reading:
            self._kick()
        try:
            if sys.version_info >= (3, 11):
                # Not wait_for: before 3.12 it can swallow the waiter's own cancellation when the
                # result lands at the same moment (CPython gh-86296).
                async with asyncio.timeout(timeout):
                    return await fut
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
            return None
        finally:
            waiting = self.waiters.get(job_id)
            if waiting is not None:
                waiting.discard(fut)
                if not waiting:  # the next XREAD leaves its stream out
                    del self.waiters[job_id]

    def _ensure_running(self) -> None:
        if self.closed:
            raise RuntimeError("the AsyncClient is closed")
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run(), name="queuebert-results")

    def _kick(self) -> None:
        self.wake.set()
        # One UNBLOCK per XREAD: the jobs awaited meanwhile are all in the next one.
        if self.in_xread and self.can_unblock and self._unblocking != self.cycle:
            self._unblocking = self.cycle
            self.client._spawn(self._unblock(self.cycle))

    async def _unblock(self, cycle: int) -> None:
        """End the XREAD of ``cycle`` early so the next one includes the newly awaited jobs."""
        try:
            for _ in range(self.UNBLOCK_TRIES):
                if self.cycle != cycle or not self.in_xread or self.conn_id is None:
                    return
                if await self.client.connection.client_unblock(self.conn_id):
                    return
                await asyncio.sleep(0.001)  # the XREAD is sent but not yet blocking in Redis
            self.conn_id = None  # never blocked under that id: redis-py reconnected; ask again
        except redis.ResponseError as exc:
            self.can_unblock = False
            log.info("CLIENT UNBLOCK refused: result reads poll instead", poll_ms=self.POLL_MS, error=str(exc))
        except redis.RedisError as exc:
            log.debug("CLIENT UNBLOCK failed", error=str(exc))
        finally:
            if self._unblocking == cycle:
                self._unblocking = None

    async def _run(self) -> None:
        delay = 0.05
        while not self.closed:
            if not self.waiters:
                self.wake.clear()
                await self.wake.wait()
                continue
            try:
                conn = await self._connection()
                # From here to the XREAD nothing awaits: a job awaited later sees in_xread and
                # unblocks the read, one awaited earlier is in it.
                streams = {Result.get_key(job_id): "0-0" for job_id in self.waiters}
                self.reading = set(self.waiters)
                self.wake.clear()
                self.cycle += 1
                self.in_xread = True
                self.reads += 1
                reply = await conn.xread(streams, block=self._block_ms())
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("result listener lost its connection; reconnecting", error=str(exc), retry_in_s=delay)
                await self._drop_connection()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            except Exception as exc:  # noqa: BLE001 - not weather: the waiters of this read hear it
                log.error("result read failed; its waiters get the error", error=repr(exc), jobs=len(self.waiters))
                self._fail_all(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            finally:
                self.in_xread = False
                self.reading = set()
            delay = 0.05
            done = [self._collect(name, entries) for name, entries in reply or []]
            if done:
                # Before the waiters wake: the batch held for a free worker goes out first, not
                # after every woken request has written its answer (~0.3 ms each in the gateway,
                # time the worker would sit idle).
                self.client._coalescer.results_arrived(sum(len(waiting) for waiting, _ in done))
            for waiting, outcome in done:
                for fut in waiting:
                    if not fut.done():
                        fut.set_result(outcome)

    def _block_ms(self) -> int:
        return fit_block_ms(self.client.connection, self.BLOCK_MS if self.can_unblock else self.POLL_MS)

    def _collect(self, name: bytes | str, entries: list[Any]) -> tuple[set[asyncio.Future[_Outcome]], _Outcome]:
        """The waiters of a result stream XREAD returned (no longer awaited) and their outcome."""
        job_id = (name.decode() if isinstance(name, bytes) else name)[len(Result.get_key("")):]
        waiting = self.waiters.pop(job_id, set())
        try:
            outcome: _Outcome = (job_value(job_id, entries[-1][1]), None)
        except JobFailed as exc:
            outcome = (None, str(exc))
        return waiting, outcome

    def _fail_all(self, exc: BaseException) -> None:
        waiters, self.waiters = self.waiters, {}
        for waiting in waiters.values():
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(exc)

    async def _connection(self) -> redis.asyncio.Redis:
        """The listener's own connection (blocked most of the time), and its CLIENT ID."""
        if self.conn is None:
            self.conn = redis.asyncio.Redis(connection_pool=self.client.connection.connection_pool,
                                            single_connection_client=True)
        if self.conn_id is None and self.can_unblock:
            self.conn_id = await self.conn.client_id()
        return self.conn

    async def _drop_connection(self) -> None:
        conn, self.conn, self.conn_id = self.conn, None, None
        if conn is not None:
            try:
                await conn.aclose()
            except redis.RedisError as exc:  # it is being replaced either way
                log.debug("closing the listener's connection failed", error=str(exc))

    async def close(self) -> None:
        self.closed = True
        task, self.task = self.task, None
        if task is not None:
            # Cancelled again until it ends: before Python 3.12, asyncio.wait_for (which redis-py 8
            # sends every command through, its socket_timeout being set) can swallow a
            # cancellation that lands as a send finishes (CPython gh-86296).
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
            if not task.cancelled() and task.exception() is not None:
                log.debug("result listener had stopped on an error", error=str(task.exception()))
        self._fail_all(RuntimeError("the AsyncClient was closed while this result was awaited"))
        await self._drop_connection()


class _Coalescer:
    """Gathers concurrent submits into one run of shared jobs, sent in one round trip; each
    submitter gets its own handle.

    How long a batch gathers depends on whether a job sent now would start at once:

    - **Something would take it** (fewer awaited jobs in flight than workers serve the queue, and
      the queue held no unstarted job at the last send): ``coalesce_ms``, enough to catch a burst.
    - **It would wait anyway** (every worker already has one of the jobs this client awaits, or
      the queue has a backlog): the batch is held, as TCP's Nagle holds small segments while data
      is unacknowledged, until an awaited result arrives and leaves a worker free, or
      ``coalesce_max_ms`` passes. The requests that arrive during one job then travel as the next
      job instead of as many one-text jobs.
    - **Closed-loop traffic** (each submitter sends again when its answer comes back, as HTTP
      clients at a fixed concurrency do; see ``_judge_loop``). Over HTTP the answered come back
      one by one over several milliseconds (each woken request writes its answer, each client
      reads it and sends again). Sent as they came, the first would go alone while the rest were
      held behind it, and the load would settle into two half-size jobs alternating, each cut into
      its own smaller forwards. So, after results for ``k`` items arrive, a batch (and one held
      until then) gathers until ``k`` submits have come since, or ``coalesce_max_ms`` has passed;
      and while every worker has one of this client's jobs, a batch is held until one of their
      results arrives (at most ``coalesce_hold_ms``, a bound for a job whose worker died), since
      its submitters are about to come back. Open-loop traffic gets neither: there a job sent
      while the worker computes joins its pool at once and is in its next forward, and nobody
      is about to come back.

    ``chunk_size`` items send a batch at once whatever the window.
    """

    #: Closed loop: submits arrive this many times as fast in the ``coalesce_max_ms`` after results
    #: as at other times (open-loop traffic: as fast, whatever the results do).
    LOOP_RATIO = 4.0
    #: Fewest submits (decayed) just after results before the traffic is judged closed-loop.
    LOOP_MIN_SUBMITS = 4.0
    #: Share of the evidence kept at each results event (an exponential average over events).
    LOOP_DECAY = 0.9

    def __init__(self, client: AsyncClient):
        self.client = client
        self.pending: dict[tuple[str, JobOptions], list[tuple[Item, asyncio.Future[AsyncHandle]]]] = {}
        self.timers: dict[tuple[str, JobOptions], asyncio.TimerHandle] = {}
        #: Batches gathering with the long window, sent early when a result arrives.
        self.held: set[tuple[str, JobOptions]] = set()
        #: Batches gathering for the submitters of results that just arrived (see above).
        self.regathering: set[tuple[str, JobOptions]] = set()
        #: Items whose results arrived before ``regather_until`` (loop time), and the submits
        #: made since the first of them.
        self.returning = self.returned = 0
        self.regather_until = 0.0
        #: Whether submitters send again as their results arrive (see ``_judge_loop``), and its
        #: evidence: submits and seconds inside and outside the windows after results.
        self.closed_loop = False
        self._in_n = self._in_s = self._out_n = self._out_s = 0.0
        self._mark: float | None = None
        #: Runs (one per gathered batch) and jobs sent, and items in them (tests and benchmarks).
        self.batches = self.jobs = self.items = 0
        #: Per queue, seen in the last send's round trip: unstarted jobs it held right after (0: a
        #: worker was waiting), and the workers RQ lists as serving it.
        self.backlog: dict[str, int] = {}
        self.workers: dict[str, int] = {}

    def would_wait(self, queue: str) -> bool:
        """Whether a job sent to ``queue`` now would wait behind work already there."""
        return self.backlog.get(queue, 0) > 0 or self._all_busy(queue)

    async def submit(self, item: Item, queue: str, options: JobOptions) -> AsyncHandle:
        key = (queue, options)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[AsyncHandle] = loop.create_future()
        batch = self.pending.setdefault(key, [])
        batch.append((item, fut))
        in_window = loop.time() < self.regather_until  # of results that just arrived
        if in_window:
            self.returned += 1
            self._in_n += 1
        else:
            self._out_n += 1
        s = self.client.settings
        if len(batch) >= s.chunk_size:
            self.flush(key)
        elif key in self.regathering:
            self._regather(key)
        elif len(batch) == 1:
            if self.would_wait(queue) and s.coalesce_max_ms > s.coalesce_ms:
                self.held.add(key)
                # Closed loop: held until one of our jobs ends, then sent with its submitters.
                hold = s.coalesce_hold_ms if self.closed_loop and self._all_busy(queue) else s.coalesce_max_ms
                self._arm(key, hold / 1000)
            elif in_window and self.closed_loop and self.returned < self.returning:
                self._regather(key)
            else:
                self._arm(key, s.coalesce_ms / 1000)
        try:
            return await fut
        except asyncio.CancelledError:
            # The submitter went away (a client that disconnected): an item still gathering is
            # never sent. One already on its way is left out of its job's holders by _send (the
            # future is cancelled), so a job nobody waits for any more is dropped once enqueued.
            self._withdraw(key, fut)
            raise

    def _withdraw(self, key: tuple[str, JobOptions], fut: asyncio.Future[AsyncHandle]) -> None:
        batch = self.pending.get(key)
        if batch is None:
            return
        batch[:] = [entry for entry in batch if entry[1] is not fut]
        if not batch:
            del self.pending[key]
            self.held.discard(key)
            self.regathering.discard(key)
            timer = self.timers.pop(key, None)
            if timer is not None:
                timer.cancel()

    def results_arrived(self, items: int) -> None:
        """Results for ``items`` awaited items arrived (their submitters are about to hear): what
        was held for a busy worker goes now (closed loop: with those submitters' next submits),
        unless every worker still has one of this client's jobs (a job sent now would still wait)."""
        now = asyncio.get_running_loop().time()
        self._judge_loop(now)
        if now >= self.regather_until:
            self.returning = self.returned = 0
        self.returning += items
        self.regather_until = now + self.client.settings.coalesce_max_ms / 1000
        for key in list(self.held):
            if not self._all_busy(key[0]):
                if self.closed_loop:
                    self.held.discard(key)
                    self._regather(key)
                else:
                    self.flush(key)

    def _judge_loop(self, now: float) -> None:
        """Closed-loop traffic (each submitter waits for its answer before sending again) shows as
        submits crowding into the windows just after results; open-loop traffic arrives at the
        same rate inside and outside them. Where windows cover most of the time (results come
        faster than ``coalesce_max_ms``) the two cannot be told apart, and nothing is assumed."""
        if self._mark is not None:
            inside = max(0.0, min(now, self.regather_until) - self._mark)
            self._in_s += inside
            self._out_s += max(0.0, now - self._mark - inside)
        self._mark = now
        # The +1: an outside with no submit yet is evidence of one, not of none.
        self.closed_loop = (self._in_n >= self.LOOP_MIN_SUBMITS and self._out_s >= self._in_s > 0
                            and self._in_n / self._in_s >= self.LOOP_RATIO * (self._out_n + 1) / self._out_s)
        self._in_n *= self.LOOP_DECAY
        self._in_s *= self.LOOP_DECAY
        self._out_n *= self.LOOP_DECAY
        self._out_s *= self.LOOP_DECAY

    def _regather(self, key: tuple[str, JobOptions]) -> None:
        """Send ``key``'s batch once every returning submitter is back, else at ``regather_until``."""
        now = asyncio.get_running_loop().time()
        if self.returned >= self.returning or now >= self.regather_until:
            self.flush(key)
            return
        if key not in self.regathering:
            self.regathering.add(key)
            self._arm(key, self.regather_until - now)

    def _arm(self, key: tuple[str, JobOptions], seconds: float) -> None:
        timer = self.timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self.timers[key] = asyncio.get_running_loop().call_later(seconds, self.flush, key)

    def _all_busy(self, queue: str) -> bool:
        return len(self.client._listener.waiters) >= max(1, self.workers.get(queue, 1))

    def flush(self, key: tuple[str, JobOptions]) -> None:
        self.held.discard(key)
        self.regathering.discard(key)
        timer = self.timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        batch = self.pending.pop(key, None)
        if batch:
            # A task of its own: a submitter that is cancelled must not cancel the others' send.
            self.client._spawn(self._send(batch, *key))

    def flush_all(self) -> None:
        for key in list(self.pending):
            self.flush(key)

    async def _send(self, batch: list[tuple[Item, asyncio.Future[AsyncHandle]]], queue: str,
                    options: JobOptions) -> None:
        items = [item for item, _ in batch]
        try:
            run_id, job_ids, self.backlog[queue], self.workers[queue] = await self.client._enqueue_run(
                [items], queue, options)
        except BaseException as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.batches += 1
        self.jobs += len(job_ids)
        self.items += len(items)
        waiting = [(index, item, fut) for index, (item, fut) in enumerate(batch) if not fut.done()]
        claim = _JobClaim(job_ids[0], queue, len(waiting), _RunClaim(run_id, 1))
        for index, item, fut in waiting:
            fut.set_result(AsyncHandle(self.client, job_ids[0], item["id"], run_id, index, _claim=claim))
        if not waiting:  # every submitter went away while it was sent: nobody will read it
            self.client._forget_soon([claim], [claim.run])


class AsyncClient:
    """Producer API on asyncio: ``AsyncClient.from_url(url, queue="default")``, then ``await
    client.submit(text)`` and ``await handle.result(timeout=...)``. Use it as ``async with`` or
    ``await client.aclose()`` it."""

    #: As Client.LOST_REPLY_TRIES.
    LOST_REPLY_TRIES = 35

    def __init__(self, connection: redis.asyncio.Redis, settings: ClientSettings | None = None):
        self.connection = connection
        self.settings = settings or ClientSettings.from_env()
        self._listener = _ResultListener(self)
        self._coalescer = _Coalescer(self)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._owns_connection = False

    @classmethod
    def from_url(cls, url: str | None = None, queue: str | None = None, *, socket_timeout: float | None = None,
                 **overrides: Any) -> AsyncClient:
        """A client on ``url`` (default ``QUEUEBERT_REDIS_URL``); no I/O until the first call.
        ``socket_timeout``: seconds a command's reply may take before that attempt fails (None:
        forever; blocking reads then block less, :func:`fit_block_ms`)."""
        settings = ClientSettings.from_env(redis_url=resolve_url(url), queue=queue, **overrides)
        extra = {} if socket_timeout is None else {"socket_timeout": socket_timeout}
        client = cls(connect_async(settings.redis_url, replica_acks=settings.replica_acks,
                                   replica_ack_timeout_ms=settings.replica_ack_timeout_ms,
                                   max_connections=settings.max_connections, **extra), settings)
        client._owns_connection = True
        return client

    async def aclose(self) -> None:
        """Send what is being gathered, stop the result listener, and close the connection if
        ``from_url`` opened it."""
        self._coalescer.flush_all()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self._listener.close()
        if self._owns_connection:
            await self.connection.aclose()
            # A Sentinel URL's client leaves its sentinels' connections to whoever made it.
            sentinels = getattr(self.connection.connection_pool, "sentinel_manager", None)
            if sentinels is not None:
                await sentinels.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """A background task, referenced until it ends (the event loop keeps only weak ones)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def coalesced(self) -> dict[str, int]:
        """Gathered batches (runs), jobs and items sent by ``submit`` so far."""
        c = self._coalescer
        return {"batches": c.batches, "jobs": c.jobs, "items": c.items}

    # -- submitting -------------------------------------------------------------------------

    async def _enqueue_run(self, chunks: list[list[Item]], queue: str | None, options: JobOptions,
                           run_id: str | None = None) -> tuple[str, list[str], int, int]:
        """Enqueue ``chunks`` as the jobs of a fresh, sealed run in one round trip; returns the run,
        its job ids, how many jobs the queue holds unstarted right after (a worker blocked on
        the queue takes a job as it is pushed, so 0 means one was waiting) and how many workers
        RQ lists as serving the queue."""
        run_id = run_id or new_id()
        job_ids = [new_id() for _ in chunks]
        queue = queue or self.settings.queue
        commands = jobs.enqueue_commands(self.settings, queue, chunks, job_ids, run_id, options)
        commands += jobs.seal_commands(self.settings, run_id, sum(len(c) for c in chunks))
        async with self.connection.pipeline(transaction=False) as pipe:
            jobs.apply(commands, pipe)
            pipe.llen(Queue.redis_queue_namespace_prefix + queue)
            pipe.scard(worker_registration.WORKERS_BY_QUEUE_KEY % queue)
            replies = await pipe.execute()
        return run_id, job_ids, int(replies[-2]), int(replies[-1])

    async def submit(
        self, text_or_item: str | dict[str, Any], *, text_pair: str | None = None, top_k: int | None = None,
        function_to_apply: str | None = None, queue: str | None = None,
    ) -> AsyncHandle:
        """One text (or ``{"id", "text", "text_pair"?, "meta"?}``); the handle awaits its result.

        Concurrent calls share jobs (see ``coalesce_ms``); with ``coalesce_ms=0`` each is one job
        of its own run, as ``Client.submit`` writes it."""
        item = normalize_item(text_or_item, new_id())
        if text_pair is not None:
            item["text_pair"] = text_pair
        queue = queue or self.settings.queue
        options = JobOptions(top_k, function_to_apply)
        if self.settings.coalesce_ms <= 0:
            run_id, (job_id,), _, _ = await self._enqueue_run([[item]], queue, options)
            return AsyncHandle(self, job_id, item["id"], run_id, 0, _claim=_JobClaim(job_id, queue, 1,
                                                                                     _RunClaim(run_id, 1)))
        return await self._coalescer.submit(item, queue, options)

    async def submit_many(
        self, items: Iterable[str | dict[str, Any]] | AsyncIterable[str | dict[str, Any]], *,
        chunk_size: int | None = None, top_k: int | None = None, function_to_apply: str | None = None,
        queue: str | None = None, run_id: str | None = None,
    ) -> list[AsyncHandle]:
        """Items in jobs of ``chunk_size`` (1: one job per item); one handle per item, all in one run."""
        run = await self.enqueue_stream(items, chunk_size=chunk_size, top_k=top_k, function_to_apply=function_to_apply,
                                        queue=queue, run_id=run_id, max_pending=0, keep_handles=True)
        by_job: dict[str, list[AsyncHandle]] = {}
        for handle in run.handles:
            by_job.setdefault(handle.job_id, []).append(handle)
        run_claim = _RunClaim(run.id, len(by_job))
        for job_id, handles in by_job.items():
            claim = _JobClaim(job_id, run.queue or queue or self.settings.queue, len(handles), run_claim)
            for handle in handles:
                handle._claim = claim
        return run.handles

    def release(self, handles: Iterable[AsyncHandle]) -> None:
        """The caller is done with these handles (``submit``, ``submit_many``): their results were
        delivered, or nobody waits for them any more. Once every handle of a job is released, the
        job's Redis keys go: a job still queued is taken off its queue and deleted (nobody will
        compute it), a finished one's hash (with its input texts), RQ result and finished-registry
        entry are deleted; a job under way is left to finish and expire by its result TTL. Once
        every job of the run is released, the run's keys go too, its meta hash left as a
        one-field tombstone for the client's result TTL so that a late second completion cannot
        bring the run back, and it leaves ``qb:runs``.

        Handles of a coalesced job belong to several callers: the job stays until the last of
        them releases, so releasing one never touches a neighbour's result. Handles not made
        here, or released already, are ignored. Returns at once; the deletes run in the
        background (awaited by :meth:`aclose`)."""
        jobs_done: list[_JobClaim] = []
        runs_done: list[_RunClaim] = []
        for handle in handles:
            claim = handle._claim
            if claim is None or handle._released:
                continue
            handle._released = True
            claim.holders -= 1
            if claim.holders == 0:
                jobs_done.append(claim)
                claim.run.jobs -= 1
                if claim.run.jobs == 0:
                    runs_done.append(claim.run)
        if jobs_done:
            self._forget_soon(jobs_done, runs_done)

    def _forget_soon(self, jobs_done: list[_JobClaim], runs_done: list[_RunClaim]) -> None:
        self._spawn(self._forget(jobs_done, runs_done))

    async def _forget(self, jobs_done: list[_JobClaim], runs_done: list[_RunClaim]) -> None:
        """:meth:`release`'s deletes. A failure is only logged: what is left expires by its TTL."""
        try:
            async with self.connection.pipeline(transaction=False) as pipe:
                for claim in jobs_done:
                    pipe.hget(Job.key_for(claim.job_id), "status")
                statuses = await pipe.execute()
            dequeuing: list[tuple[_JobClaim, int]] = []  # a queued job and its LREM's reply index
            async with self.connection.pipeline(transaction=False) as pipe:
                for claim, status in zip(jobs_done, statuses):
                    commands = jobs.forget_job_commands(claim.job_id, claim.queue, status)
                    if commands and commands[0].name == "lrem":
                        dequeuing.append((claim, len(pipe)))
                    jobs.apply(commands, pipe)
                for run in runs_done:
                    await _maybe_await(forget_run(self.connection, pipe, run.run_id, self.settings.result_ttl))
                if runs_done:
                    pipe.zrem(keys.RUNS, *(run.run_id for run in runs_done))
                replies = await pipe.execute()
            dropped = [claim for claim, at in dequeuing if replies[at]]
            if dropped:
                async with self.connection.pipeline(transaction=False) as pipe:
                    for claim in dropped:
                        jobs.apply(jobs.drop_dequeued_commands(claim.job_id), pipe)
                    await pipe.execute()
                log.debug("released jobs dropped from their queue unstarted", jobs=len(dropped))
        except redis.RedisError as exc:
            log.warning("could not delete released jobs; they expire by their TTL", jobs=len(jobs_done),
                        error=repr(exc))

    async def seal(self, run_id: str, total: int | None = None) -> int:
        """Mark the run complete on the producer side: ``total`` is now final."""
        if total is None:
            total = int(await self.connection.hget(keys.run_meta(run_id), "enqueued") or 0)
        async with self.connection.pipeline(transaction=False) as pipe:
            jobs.apply(jobs.seal_commands(self.settings, run_id, total), pipe)
            await pipe.execute()
        return total

    async def enqueue_stream(
        self,
        iterable: Iterable[str | dict[str, Any]] | AsyncIterable[str | dict[str, Any]],
        *,
        chunk_size: int | None = None,
        max_pending: int | None = None,
        run_id: str | None = None,
        top_k: int | None = None,
        function_to_apply: str | None = None,
        queue: str | None = None,
        on_progress: Callable[[int], Any] | None = None,
        keep_handles: bool = False,
        job_ttl: float | None | _Setting = SETTING,
    ) -> AsyncRun:
        """Enqueue a (sync or async) iterable lazily, in pipelined round trips, as one run:
        ``Client.enqueue_stream`` on asyncio, with the same backpressure (``max_pending``), full
        Redis waits (:class:`RedisFull`), once-only rounds (WATCH on the run's cursor) and resume
        by ``run_id`` (:class:`ResumeError`, :class:`~producer.jobs.LostWrites`).
        ``on_progress`` may be a coroutine function. ``job_ttl`` (seconds a job may wait before
        it is dropped; None: no deadline) overrides the client's ``job_ttl`` for this run: one
        client can serve interactive requests with a deadline and long streams without one."""
        settings = self.settings if job_ttl is SETTING else dataclasses.replace(self.settings, job_ttl=job_ttl)
        run = AsyncRun(self, run_id or new_id())
        async with self.connection.pipeline(transaction=False) as pipe:
            pipe.get(keys.run_cursor(run.id))
            pipe.hmget(keys.run_meta(run.id), *jobs.RESUME_FIELDS)
            raw_cursor, stored = await pipe.execute()
        plan = jobs.resume_plan(self.settings, run.id, raw_cursor, stored, chunk_size, queue, log)
        chunk_size, queue, resume_from = plan.chunk_size, plan.queue, plan.resume_from
        run.queue = queue or self.settings.queue
        max_pending = self.settings.max_pending if max_pending is None else max_pending
        counter = itertools.count()

        async def source() -> AsyncIterator[Item]:
            async for value in _aiterate(iterable):
                yield normalize_item(value, f"{next(counter)}")

        async def progress(n: int) -> None:
            if on_progress is not None:
                await _maybe_await(on_progress(n))

        if plan.sealed:
            return await self._resume_sealed(run, source(), plan.total, plan.listed, chunk_size, keep_handles,
                                             progress)

        full = _AsyncFullWait(self, run)
        batch: list[list[Item]] = []
        chunk: list[Item] = []
        position = 0  # chunks built so far = index in the run's job list of the next chunk
        skipped_ids: list[list[str]] = []  # with keep_handles: item ids of the chunks skipped

        async def skipping_done() -> None:
            if run.skipped:
                if keep_handles:
                    await self._skipped_handles(run, skipped_ids)
                await progress(run.skipped)
                log.info("skipped what was already enqueued", run=run.id, items=run.skipped, jobs=run.jobs)

        async def take(items: list[Item]) -> None:
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
                await skipping_done()
            batch.append(items)
            if len(batch) >= JOBS_PER_ROUND_TRIP:
                await flush()

        async def flush() -> None:
            start = position - len(batch)
            job_ids, round_progress = await self._enqueue_round(batch, run, start, chunk_size,
                                                                JobOptions(top_k, function_to_apply), queue, full,
                                                                settings)
            for job_id, items in zip(job_ids, batch):
                if keep_handles:
                    run.handles.extend(AsyncHandle(self, job_id, it["id"], run.id, n) for n, it in enumerate(items))
                run.enqueued += len(items)
            run.jobs += len(job_ids)
            await progress(sum(len(c) for c in batch))
            batch.clear()
            if max_pending:
                await self._wait_for_room(run.id, round_progress, max_pending)

        try:
            async for item in source():
                chunk.append(item)
                if len(chunk) >= chunk_size:
                    await take(chunk)
                    chunk = []
            if chunk:
                await take(chunk)
            if position < resume_from:
                raise ResumeError(f"run {run.id} already lists {resume_from} jobs but this input makes only "
                                  f"{position} of {chunk_size} items: it is not the input the run was started with")
            if position == resume_from:
                await skipping_done()
            if batch:
                await flush()
            await self._seal_waiting(run, full)
        except (RedisFull, ResumeError):
            raise
        except BaseException as exc:  # cancelled, a lost connection, an unreadable input line
            exc.add_note(f"run {run.id}: {run.enqueued} items enqueued; {resume_hint(run.id)}")
            raise
        log.debug("run enqueued", run=run.id, items=run.enqueued, jobs=run.jobs, skipped=run.skipped)
        return run

    async def _enqueue_round(
        self, chunks: list[list[Item]], run: AsyncRun, start: int, chunk_size: int, options: JobOptions,
        queue: str | None, full: _AsyncFullWait, settings: ClientSettings | None = None,
    ) -> tuple[list[str], dict[str, int]]:
        """``Client._enqueue_round`` on asyncio: one transaction, WATCHing the run's cursor, so a
        round whose reply was lost is looked up rather than applied twice. ``settings``: the run's
        (its own ``job_ttl``), else the client's."""
        end = start + len(chunks)
        job_ids = [new_id() for _ in chunks]
        commands = jobs.enqueue_commands(settings or self.settings, queue or self.settings.queue, chunks, job_ids,
                                         run.id, options, chunk_size=chunk_size, cursor_end=end)
        meta = keys.run_meta(run.id)
        cursor_key = keys.run_cursor(run.id)
        ttl = self.settings.result_ttl
        lost_replies = 0
        size = jobs.round_size(chunks)
        async with self.connection.pipeline(transaction=True) as pipe:
            while True:
                if await full.tight(adding=size):
                    await full.wait()
                    continue
                # Not inside the try: WATCH is not yet watching, so redis-py retries a dead
                # connection itself and a Redis that stays down ends the enqueue here.
                await pipe.watch(cursor_key)
                try:
                    cursor = int(await pipe.get(cursor_key) or 0)
                    if jobs.check_cursor(run.id, cursor, start, end):  # applied already: only its reply was lost
                        await pipe.expire(cursor_key, ttl)
                        enqueued, done = (int(v or 0) for v in await pipe.hmget(meta, "enqueued", "done"))
                        listed = [j.decode() for j in await pipe.lrange(keys.run_jobs(run.id), start, end - 1)]
                        log.info("round already applied", run=run.id, jobs=f"{start}..{end - 1}")
                        full.clear()
                        return (listed if len(listed) == len(job_ids) else job_ids), {"enqueued": enqueued, "done": done}
                    pipe.multi()
                    jobs.apply(commands, pipe)
                    replies = await pipe.execute()
                except redis.exceptions.OutOfMemoryError:
                    await full.wait()
                    continue
                except (redis.WatchError, redis.ConnectionError, redis.TimeoutError) as exc:
                    lost_replies += 1
                    if lost_replies > self.LOST_REPLY_TRIES:
                        raise
                    if lost_replies == 1 or lost_replies % 10 == 0:
                        log.warning("enqueue round interrupted, checking whether it went in", run=run.id,
                                    error=str(exc), attempt=lost_replies)
                    await asyncio.sleep(min(0.05 * 2 ** (lost_replies - 1), 2.0))
                    continue
                finally:
                    await pipe.reset()
                full.clear()
                enqueued, done = (int(v or 0) for v in replies[-1])
                return job_ids, {"enqueued": enqueued, "done": done}

    async def _seal_waiting(self, run: AsyncRun, full: _AsyncFullWait) -> None:
        while True:
            try:
                await self.seal(run.id, run.enqueued)
            except redis.exceptions.OutOfMemoryError:
                await full.wait()
                continue
            full.clear()
            return

    async def _resume_sealed(
        self, run: AsyncRun, source: AsyncIterator[Item], total: int, listed: int, chunk_size: int,
        keep_handles: bool, progress: Callable[[int], Awaitable[None]],
    ) -> AsyncRun:
        """A sealed run is complete: count the input (nothing is sent) and check it matches."""
        items = [it async for it in source] if keep_handles else None
        if items is not None:
            count = len(items)
        else:
            count = 0
            async for _ in source:
                count += 1
        if count != total:
            raise ResumeError(f"run {run.id} is complete with {total} items but this input has {count}: "
                              "it is not the input the run was started with")
        run.enqueued = run.skipped = total
        run.jobs = listed
        if items is not None:
            await self._skipped_handles(run, [[it["id"] for it in items[i:i + chunk_size]]
                                              for i in range(0, len(items), chunk_size)])
        await progress(total)
        log.info("run already complete: nothing to enqueue", run=run.id, items=total)
        return run

    async def _skipped_handles(self, run: AsyncRun, skipped_ids: list[list[str]]) -> None:
        raw = await self.connection.lrange(keys.run_jobs(run.id), 0, len(skipped_ids) - 1)
        job_ids = [j.decode() for j in raw]
        if len(job_ids) != len(skipped_ids):
            log.warning("the run's job list is gone: no handles for the items enqueued earlier", run=run.id)
            return
        for job_id, ids in zip(job_ids, skipped_ids):
            run.handles.extend(AsyncHandle(self, job_id, item_id, run.id, n) for n, item_id in enumerate(ids))

    async def _wait_for_room(self, run_id: str, progress: dict[str, int], max_pending: int) -> None:
        pending = progress["enqueued"] - progress["done"]
        # Short polls: a long sleep here lets the workers drain the queue and then idle.
        delay = 0.002
        while pending > max_pending:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            raw = await self.connection.hmget(keys.run_meta(run_id), "enqueued", "done")
            enqueued, done = (int(v or 0) for v in raw)
            pending = enqueued - done

    # -- pairs ------------------------------------------------------------------------------

    async def rerank(
        self, query: str, passages: Sequence[str], *, top_n: int | None = None, return_text: bool = False,
        label: str | None = None, timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """``Client.rerank``: passages ranked by a cross-encoder's score for ``(query, passage)``,
        best first, as text-embeddings-inference's ``/rerank`` returns them."""
        passages = list(passages)
        results = [r async for r in self._stream_through(pairs.pair_items("0", query, passages), run_id=new_id(),
                                                          max_pending=0, timeout=timeout)]
        return pairs.ranking(results, passages if return_text else None, top_n, label)

    async def zero_shot(
        self, texts: str | Iterable[str | dict[str, Any]], candidate_labels: Sequence[str] | str, *,
        hypothesis_template: str = DEFAULT_HYPOTHESIS_TEMPLATE, multi_label: bool = False,
        timeout: float | None = None, run_id: str | None = None, chunk_size: int | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """``Client.zero_shot``: ``{"id", "labels", "scores"}`` per text, labels best first (one
        dict for one text, as the pipeline)."""
        single = isinstance(texts, str)
        items = [pairs.zero_shot_item(t, candidate_labels, hypothesis_template, multi_label)
                 for t in ([texts] if single else texts)]  # type: ignore[union-attr]
        results = [r async for r in self._stream_through(items, run_id=run_id or new_id(), chunk_size=chunk_size,
                                                          max_pending=0, timeout=timeout)]
        return results[0] if single else results  # type: ignore[return-value]

    async def _stream_through(
        self, items: Iterable[Any] | AsyncIterable[Any], *, run_id: str, chunk_size: int | None = None,
        max_pending: int | None = None, timeout: float | None = None, top_k: int | None = None,
        consume: bool = True,
    ) -> AsyncIterator[ItemResult]:
        """``pairs.stream_through`` on asyncio: enqueue ``items`` as one run in a task while yielding
        their results in input order; with ``consume`` each job's results leave Redis once read."""
        failed: list[BaseException] = []

        async def produce() -> None:
            try:
                await self.enqueue_stream(items, chunk_size=chunk_size, max_pending=max_pending, run_id=run_id,
                                          top_k=top_k)
            except BaseException as exc:  # surfaced to the reader
                failed.append(exc)
                await self.seal(run_id)  # so the reader ends
                if not isinstance(exc, Exception):
                    raise

        producer = asyncio.create_task(produce())
        try:
            async for result in self.ordered_results(run_id, timeout=timeout, consume=consume):
                if failed:
                    break
                yield result
            await producer
        finally:
            if not producer.done():
                producer.cancel()
        if failed:
            raise failed[0]

    # -- reading results --------------------------------------------------------------------

    async def run_progress(self, run_id: str) -> dict[str, int]:
        return jobs.parse_progress(await self.connection.hmget(keys.run_meta(run_id), *jobs.PROGRESS_FIELDS))

    async def job_results(
        self, job_id: str, timeout: float | None = 0, item_id: str | None = None,
    ) -> list[ItemResult] | ItemResult | None:
        """A job's item results (or item ``item_id``'s) from RQ's result stream; None if not there
        within ``timeout`` (0: just look; None: wait for ever). Waits share the client's one result
        listener; :class:`JobFailed` if the job failed as a whole."""
        if timeout == 0:
            entries = await self.connection.xrevrange(Result.get_key(job_id), "+", "-", count=1)
            value = job_value(job_id, entries[-1][1]) if entries else None
        else:
            outcome = await self._listener.wait(job_id, timeout)
            if outcome is None:
                return None
            value, failure = outcome
            if value is None:
                raise JobFailed(failure)
        return value if value is None or item_id is None else pick_item(value, item_id)

    def subscribe(
        self, run_id: str, from_start: bool = True, last_id: str | None = None, timeout: float | None = None,
        on_idle: Callable[[], Any] | None = None,
    ) -> AsyncSubscription:
        """Item results as jobs complete (``async for``); resumable from ``last_id``.
        ``from_start=False`` starts after the entries already in the stream when iteration starts."""
        start = last_id or ("0-0" if from_start else AsyncSubscription.TAIL)
        return AsyncSubscription(self, run_id, last_id=start, timeout=timeout, on_idle=on_idle)

    async def ordered_results(
        self, run_id: str, timeout: float | None = None, consume: bool = False,
        on_idle: Callable[[], Any] | None = None, before_delete: Callable[[], Any] | None = None,
    ) -> AsyncIterator[ItemResult]:
        """The run's item results in input order, each yielded as soon as all before it are in
        (``Client.ordered_results``, with the same ``consume``/``before_delete``/``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        consumed: list[tuple[str, str | None]] = []

        async def delete_consumed(final: bool = False) -> None:
            if consumed or final:
                if before_delete is not None:
                    await _maybe_await(before_delete())
                await self._delete_consumed(run_id, consumed, final=final)
                consumed.clear()

        async def idle() -> None:
            # Nothing arrived for a while: delete what was read now (see Client.ordered_results).
            await delete_consumed()
            if on_idle is not None:
                await _maybe_await(on_idle())

        entries = self.subscribe(run_id, timeout=timeout, on_idle=idle).entries()
        jobs_key = keys.run_jobs(run_id)
        arrived: dict[str, list[ItemResult]] = {}
        entry_ids: dict[str, str] = {}
        yielded: set[str] = set()  # a job id listed twice (a retried enqueue) is yielded once
        window: deque[str] = deque()
        position = 0  # index in the run's job list of the next job to yield
        try:
            while True:
                if not window:
                    sealed = (await self.run_progress(run_id))["sealed"]
                    window.extend(j.decode() for j in await self.connection.lrange(jobs_key, position,
                                                                                   position + 9_999))
                    if not window:
                        if sealed:  # sealed is set after the last job id was listed
                            if consume:
                                await delete_consumed(final=True)
                            return
                        if deadline is not None and time.monotonic() >= deadline:
                            raise TimeoutError(f"run {run_id} not finished within {timeout} s: every job listed "
                                               "so far is read, and the run is not sealed (is its producer still "
                                               "running?)")
                        await delete_consumed()  # the producer may be waiting for exactly this memory
                        await asyncio.sleep(0.05)  # the producer is still enqueueing
                        continue
                job_id = window.popleft()
                position += 1
                if job_id in yielded:
                    continue
                while job_id not in arrived:
                    try:
                        entry_id, done_job, results = await anext(entries)
                    except StopAsyncIteration:
                        # The run finished but this job's entry is gone (expired or trimmed):
                        # fall back to RQ's own result for it.
                        fallback = await self.job_results(job_id, timeout=0)
                        arrived[job_id] = fallback if isinstance(fallback, list) else []
                        break
                    arrived[done_job] = results
                    entry_ids[done_job] = entry_id
                yielded.add(job_id)
                for result in arrived.pop(job_id):
                    yield result
                if consume:
                    # Only after the caller took them (the generator resumed): nothing is deleted unread.
                    consumed.append((job_id, entry_ids.pop(job_id, None)))
                    if len(consumed) >= 256:
                        await delete_consumed()
        finally:
            await entries.aclose()

    async def _delete_consumed(self, run_id: str, consumed: list[tuple[str, str | None]], final: bool = False) -> None:
        queue = await self.connection.hget(keys.run_meta(run_id), "queue")
        async with self.connection.pipeline(transaction=False) as pipe:
            jobs.apply(jobs.delete_consumed_commands(run_id, queue, consumed), pipe)
            if final:
                # The run is over and read: its bookkeeping goes too, and it is marked consumed
                # so that a late second completion cannot reopen it.
                await finish_consumed(self.connection, pipe, run_id)
            await pipe.execute()
