"""The asyncio client: :class:`~producer.client.Client`'s operations on redis.asyncio, for web services.

What it does in Redis is :mod:`producer.protocol`'s steps, shared with ``Client``; this module
carries their effects out on a redis.asyncio connection (:class:`_AsyncDriver`), so the jobs, run
bookkeeping, resume and reads are the same code in both clients. Two things are its own, because
an event loop serving many small requests needs them:

- **Coalescing.** Concurrent :meth:`AsyncClient.submit` calls are gathered into shared jobs of up
  to ``chunk_size`` items (one run per gathered batch), each item keeping its own handle: a
  one-text job costs Redis about 40 times what a text in a full job costs. When a batch goes is
  :class:`~producer.coalescing.CoalescingPolicy`'s decision; :class:`_Coalescer` keeps the
  batches, their timers and their sends.
- **One reader for every waiting result.** ``await handle.result()`` registers a future with the
  client's result listener, one task that XREADs the RQ result streams of all awaited jobs in one
  blocking call on one connection; a newly awaited job interrupts that call (``CLIENT UNBLOCK``)
  so that it is read at once. A thousand waiters cost one connection, not a thousand.

One client belongs to one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import itertools
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, TypeVar, Unpack

import redis
import redis.asyncio
import structlog
from rq import Queue, worker_registration
from rq.job import Job
from rq.results import Result

from queuebert import keys
from queuebert.connection import connect_async, resolve_url
from queuebert.results import forget_run
from queuebert.schema import DEFAULT_HYPOTHESIS_TEMPLATE, Item, ItemResult, JobOptionFields, JobOptions, normalize_item
from queuebert.settings import ClientSettings

from . import effects, jobs, pairs, protocol
from .coalescing import SEND, CoalescingPolicy, Decision, HoldUntil
from .effects import Stepper, Steps
from .protocol import (
    HandleRecord,
    JobFailed,
    ProducerProtocol,
    RunRecord,
    SubscriptionRecord,
    fit_block_ms,
    job_value,
    pick_item,
)

log = structlog.get_logger(__name__)

__all__ = ["AsyncClient", "AsyncHandle", "AsyncRun", "AsyncSubscription"]

T = TypeVar("T")


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
class AsyncHandle(HandleRecord):
    """One submitted item: where its result will appear."""

    client: AsyncClient
    #: Shared with the other handles of its job (``submit``, ``submit_many``); None: not releasable.
    _claim: _JobClaim | None = field(default=None, repr=False, compare=False)
    _released: bool = field(default=False, repr=False, compare=False)

    async def result(self, timeout: float | None = 0) -> ItemResult | None:
        """The item's result; waits up to ``timeout`` seconds (None: forever, 0: just look).
        Raises :class:`JobFailed` if its job failed as a whole."""
        # Without item_id, job_results gives the job's list (its return type also covers one item's).
        return self.pick(await self.client.job_results(self.job_id, timeout=timeout))  # type: ignore[arg-type]


@dataclass
class AsyncRun(RunRecord):
    """A set of items enqueued together (``enqueue_stream``); as :class:`producer.client.Run`."""

    client: AsyncClient
    handles: list[AsyncHandle] = field(default_factory=list)

    async def progress(self) -> dict[str, int]:
        return await self.client.run_progress(self.id)

    async def is_done(self) -> bool:
        return self.finished(await self.progress())

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


class AsyncSubscription(SubscriptionRecord):
    """Item results of a run as their jobs complete, read from the run's stream (``async for``);
    ``last_id`` says where to resume (see :class:`~producer.protocol.SubscriptionRecord`)."""

    #: ``last_id`` meaning "after the entries already in the stream", resolved at the first read
    #: (not XREAD's ``$``, which would skip what arrives between two reads).
    TAIL = protocol.TAIL

    client: AsyncClient

    async def entries(self) -> AsyncIterator[tuple[str, str, list[ItemResult]]]:
        """``(stream_id, job_id, results)`` per completed job, each job once."""
        async with contextlib.aclosing(self.client._driver.outputs(self.read_steps())) as entries:
            async for entry in entries:
                self.last_id = entry.entry_id
                yield entry.entry_id, entry.job_id, entry.results

    async def _items(self) -> AsyncIterator[ItemResult]:
        async with contextlib.aclosing(self.client._driver.outputs(self.read_steps())) as entries:
            async for entry in entries:
                for result in self.handed_over(entry):
                    yield result

    def __aiter__(self) -> AsyncIterator[ItemResult]:
        return self._items()


async def _maybe_await(value: Any) -> Any:
    return await value if isinstance(value, Awaitable) else value


async def _aiterate(iterable: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(iterable, AsyncIterable):
        async for value in iterable:
            yield value
    else:
        for value in iterable:
            yield value


class _AsyncDriver:
    """Carries out :mod:`producer.protocol`'s effects on a redis.asyncio connection: the whole
    I/O of the asyncio client's enqueues and reads (``producer.client._SyncDriver`` on asyncio)."""

    def __init__(self, connection: redis.asyncio.Redis):
        self.connection = connection

    async def run(self, steps: Steps[T]) -> T:
        """Drive ``steps`` to its end; its return value."""
        stepper = Stepper(steps)
        async with contextlib.aclosing(self._outputs(stepper)) as outputs:
            async for out in outputs:
                raise RuntimeError(f"a step that streams was run for its value: {out!r}")
        return stepper.value

    def outputs(self, steps: Steps[Any]) -> AsyncGenerator[Any, None]:
        """Drive ``steps``, yielding its outputs."""
        return self._outputs(Stepper(steps))

    async def _outputs(self, stepper: Stepper) -> AsyncGenerator[Any, None]:
        tx: list[Any] = []  # the transaction pipeline of a checked round, once there is one
        try:
            while (effect := stepper.next()) is not effects.DONE:
                if isinstance(effect, effects.OUTPUTS):
                    yield effect
                    continue
                try:
                    stepper.reply = await self._perform(effect, tx)
                except BaseException as exc:  # noqa: BLE001 - thrown into the step, which decides
                    stepper.error = exc
        finally:
            stepper.steps.close()
            if tx:
                await tx[0].reset()

    async def _perform(self, effect: Any, tx: list[Any]) -> Any:
        if isinstance(effect, effects.Call):
            c = effect.command
            return await getattr(self.connection, c.name)(*c.args, **c.kwargs)
        if isinstance(effect, effects.Send):
            async with self.connection.pipeline(transaction=False) as pipe:
                for command in effect.commands:
                    if isinstance(command, effects.ScriptCall):
                        await _maybe_await(command.function(self.connection, pipe, *command.args))
                    else:
                        getattr(pipe, command.name)(*command.args, **command.kwargs)
                return await pipe.execute()
        if isinstance(effect, effects.TRANSACTION):
            if not tx:
                tx.append(self.connection.pipeline(transaction=True))
            try:
                return await self._transact(tx[0], effect)
            except BaseException:
                await tx[0].reset()  # a watch that failed is over: the step starts the next one afresh
                raise
        if isinstance(effect, effects.Sleep):
            await asyncio.sleep(effect.seconds)
            return None
        if isinstance(effect, effects.Notify):
            return await _maybe_await(effect.callback(*effect.args))
        if isinstance(effect, effects.NextChunk):
            return await _next_chunk(effect.source, effect.size)
        raise TypeError(f"not an effect: {effect!r}")

    @staticmethod
    async def _transact(pipe: Any, effect: effects.Watch | effects.WatchedCall | effects.Exec | effects.Unwatch) -> Any:
        if isinstance(effect, effects.Watch):
            return await pipe.watch(effect.key)
        if isinstance(effect, effects.WatchedCall):
            c = effect.command
            return await getattr(pipe, c.name)(*c.args, **c.kwargs)
        if isinstance(effect, effects.Exec):
            pipe.multi()
            jobs.apply(effect.commands, pipe)
            return await pipe.execute()
        return await pipe.reset()


async def _next_chunk(source: Any, size: int) -> list[Any]:
    """Up to ``size`` values of a sync or async iterator."""
    if not hasattr(source, "__anext__"):
        return list(itertools.islice(source, size))
    chunk: list[Any] = []
    while len(chunk) < size:
        try:
            chunk.append(await anext(source))
        except StopAsyncIteration:
            break
    return chunk


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
            # Not wait_for: before 3.12 it can swallow the waiter's own cancellation when the
            # result lands at the same moment (CPython gh-86296).
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
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
                streams: dict[Any, Any] = {Result.get_key(job_id): "0-0" for job_id in self.waiters}
                self.reading = set(self.waiters)
                self.wake.clear()
                self.cycle += 1
                self.in_xread = True
                self.reads += 1
                reply: Any = await conn.xread(streams, block=self._block_ms())
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
    submitter gets its own handle. When a batch goes is :class:`CoalescingPolicy`'s decision (on
    the event loop's clock); this keeps the batches, their timers and their sends, and tells the
    policy what it sees: each submit, each arrival of results, each send's view of the queue."""

    def __init__(self, client: AsyncClient):
        self.client = client
        self.policy = CoalescingPolicy.from_settings(client.settings, clock=lambda: asyncio.get_running_loop().time())
        self.pending: dict[tuple[str, JobOptions], list[tuple[Item, asyncio.Future[AsyncHandle]]]] = {}
        self.timers: dict[Hashable, asyncio.TimerHandle] = {}
        #: Runs (one per gathered batch) and jobs sent, and items in them (tests and benchmarks).
        self.batches = self.jobs = self.items = 0

    def _awaited(self) -> int:
        """This client's jobs whose results are awaited now."""
        return len(self.client._listener.waiters)

    async def submit(self, item: Item, queue: str, options: JobOptions) -> AsyncHandle:
        key = (queue, options)
        fut: asyncio.Future[AsyncHandle] = asyncio.get_running_loop().create_future()
        batch = self.pending.setdefault(key, [])
        batch.append((item, fut))
        self._apply(key, self.policy.submitted(key, queue, len(batch), self._awaited()))
        try:
            return await fut
        except asyncio.CancelledError:
            # The submitter went away (a client that disconnected): an item still gathering is
            # never sent. One already on its way is left out of its job's holders by _send (the
            # future is cancelled), so a job nobody waits for any more is dropped once enqueued.
            self._withdraw(key, fut)
            raise

    def results_arrived(self, items: int) -> None:
        """Results for ``items`` awaited items arrived (see :meth:`CoalescingPolicy.results_arrived`)."""
        for key, decision in self.policy.results_arrived(items, self._awaited()).items():
            # The policy keys batches by any hashable; this client's keys are (queue, options) pairs.
            self._apply(key, decision)  # type: ignore[arg-type]

    def _apply(self, key: tuple[str, JobOptions], decision: Decision) -> None:
        if decision is SEND:
            self.flush(key)
        elif isinstance(decision, HoldUntil):
            timer = self.timers.pop(key, None)
            if timer is not None:
                timer.cancel()
            self.timers[key] = asyncio.get_running_loop().call_at(decision.deadline, self.flush, key)

    def _withdraw(self, key: tuple[str, JobOptions], fut: asyncio.Future[AsyncHandle]) -> None:
        batch = self.pending.get(key)
        if batch is None:
            return
        batch[:] = [entry for entry in batch if entry[1] is not fut]
        if not batch:
            del self.pending[key]
            self.policy.forget(key)
            timer = self.timers.pop(key, None)
            if timer is not None:
                timer.cancel()

    def flush(self, key: tuple[str, JobOptions]) -> None:
        self.policy.forget(key)
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
            run_id, job_ids, backlog, workers = await self.client._enqueue_run([items], queue, options)
        except BaseException as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.policy.observed(queue, backlog, workers)
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

    def __init__(self, connection: redis.asyncio.Redis, settings: ClientSettings | None = None):
        self.connection = connection
        self.settings = settings or ClientSettings.from_env()
        self._driver = _AsyncDriver(connection)
        self._protocol = ProducerProtocol(self.settings, log, functools.partial(AsyncHandle, self))
        self._listener = _ResultListener(self)
        self._coalescer = _Coalescer(self)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._owns_connection = False

    @classmethod
    def from_url(cls, url: str | None = None, queue: str | None = None, *, socket_timeout: float | None = None,
                 **overrides: Any) -> AsyncClient:
        """A client on ``url`` (default ``QUEUEBERT_REDIS_URL``); no I/O until the first call.
        ``socket_timeout``: seconds a command's reply may take before that attempt fails (None:
        forever; blocking reads then block less, :func:`~producer.protocol.fit_block_ms`)."""
        settings = ClientSettings.from_env(redis_url=resolve_url(url), queue=queue, **overrides)
        extra: dict[str, Any] = {} if socket_timeout is None else {"socket_timeout": socket_timeout}
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
        RQ lists as serving the queue (the coalescing policy's view of the queue)."""
        run_id = run_id or jobs.new_id()
        queue = queue or self.settings.queue
        job_ids, commands = protocol.fresh_run_commands(self.settings, queue, chunks, run_id, options)
        async with self.connection.pipeline(transaction=False) as pipe:
            jobs.apply(commands, pipe)
            pipe.llen(Queue.redis_queue_namespace_prefix + queue)
            pipe.scard(worker_registration.WORKERS_BY_QUEUE_KEY % queue)
            replies = await pipe.execute()
        return run_id, job_ids, int(replies[-2]), int(replies[-1])

    async def submit(
        self, text_or_item: str | dict[str, Any], *, text_pair: str | None = None, queue: str | None = None,
        **options: Unpack[JobOptionFields],
    ) -> AsyncHandle:
        """One text (or ``{"id", "text", "text_pair"?, "meta"?}``); the handle awaits its result.

        Concurrent calls share jobs (see ``coalesce_ms``); with ``coalesce_ms=0`` each is one job
        of its own run, as ``Client.submit`` writes it. ``options``: the job's
        :class:`~queuebert.schema.JobOptions`; only submits with equal options share a job."""
        job_options = JobOptions(**options)
        item = normalize_item(text_or_item, jobs.new_id())
        if text_pair is not None:
            item["text_pair"] = text_pair
        queue = queue or self.settings.queue
        if self.settings.coalesce_ms <= 0:
            run_id, (job_id,), _, _ = await self._enqueue_run([[item]], queue, job_options)
            return AsyncHandle(self, job_id, item["id"], run_id, 0, _claim=_JobClaim(job_id, queue, 1,
                                                                                     _RunClaim(run_id, 1)))
        return await self._coalescer.submit(item, queue, job_options)

    async def submit_many(
        self, items: Iterable[str | dict[str, Any]] | AsyncIterable[str | dict[str, Any]], *,
        chunk_size: int | None = None, queue: str | None = None, run_id: str | None = None,
        **options: Unpack[JobOptionFields],
    ) -> list[AsyncHandle]:
        """Items in jobs of ``chunk_size`` (1: one job per item); one handle per item, all in one run."""
        run = await self.enqueue_stream(items, chunk_size=chunk_size, queue=queue, run_id=run_id, max_pending=0,
                                        keep_handles=True, **options)
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
        return await self._driver.run(self._protocol.seal(run_id, total))

    async def enqueue_stream(
        self,
        iterable: Iterable[str | dict[str, Any]] | AsyncIterable[str | dict[str, Any]],
        *,
        chunk_size: int | None = None,
        max_pending: int | None = None,
        run_id: str | None = None,
        queue: str | None = None,
        on_progress: Callable[[int], Any] | None = None,
        keep_handles: bool = False,
        job_ttl: float | None | _Setting = SETTING,
        **options: Unpack[JobOptionFields],
    ) -> AsyncRun:
        """Enqueue a (sync or async) iterable lazily, in pipelined round trips, as one run:
        ``Client.enqueue_stream`` on asyncio (the same steps), with the same backpressure
        (``max_pending``), full Redis waits (:class:`RedisFull`), once-only rounds (WATCH on the
        run's cursor) and resume by ``run_id`` (:class:`ResumeError`,
        :class:`~producer.jobs.LostWrites`). ``on_progress`` may be a coroutine function.
        ``job_ttl`` (seconds a job may wait before it is dropped; None: no deadline) overrides the
        client's ``job_ttl`` for this run: one client can serve interactive requests with a
        deadline and long streams without one. ``options``: every job's
        :class:`~queuebert.schema.JobOptions`, checked before anything is written."""
        job_options = JobOptions(**options)
        job_settings = None if job_ttl is SETTING else dataclasses.replace(self.settings, job_ttl=job_ttl)
        run = AsyncRun(self, run_id or jobs.new_id())
        source = aiter(iterable) if isinstance(iterable, AsyncIterable) else iter(iterable)
        await self._driver.run(self._protocol.enqueue_stream(
            run, source, chunk_size=chunk_size, max_pending=max_pending, queue=queue,
            options=job_options, on_progress=on_progress, keep_handles=keep_handles,
            job_settings=job_settings))
        return run

    # -- pairs ------------------------------------------------------------------------------

    async def rerank(
        self, query: str, passages: Sequence[str], *, top_n: int | None = None, return_text: bool = False,
        label: str | None = None, timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """``Client.rerank``: passages ranked by a cross-encoder's score for ``(query, passage)``,
        best first, as text-embeddings-inference's ``/rerank`` returns them."""
        answers = [a async for a in self.rerank_many([{"query": query, "passages": list(passages)}], top_n=top_n,
                                                     return_text=return_text, label=label, timeout=timeout)]
        return answers[0]["results"]

    async def rerank_many(
        self, queries: Iterable[dict[str, Any]] | AsyncIterable[dict[str, Any]], *, top_n: int | None = None,
        return_text: bool = False, label: str | None = None, timeout: float | None = None,
        run_id: str | None = None, chunk_size: int | None = None, max_pending: int | None = None,
        on_enqueued: Callable[[int], Any] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """``Client.rerank_many``: ``{"id", "results": [{"index", "score", "text"?}], "meta"?}``
        per ``{"id"?, "query", "passages"}`` (a sync or async iterable), in input order. All pairs
        go out as one run (``enqueue_stream``, with its backpressure) while answers come back, and
        each query's results leave Redis once read. ``on_enqueued`` may be a coroutine function."""
        reranking = pairs.Reranking(top_n=top_n, return_text=return_text, label=label)

        async def items() -> AsyncIterator[Item]:
            n = 0
            async for query in _aiterate(queries):
                for item in reranking.pairs(n, query):
                    yield item
                n += 1

        async for result in self._stream_through(items(), run_id=run_id or jobs.new_id(), chunk_size=chunk_size,
                                                 max_pending=max_pending, timeout=timeout, on_enqueued=on_enqueued):
            for answer in reranking.add(result):
                yield answer
        for answer in reranking.rest():
            yield answer

    async def zero_shot(
        self, texts: str | Iterable[str | dict[str, Any]], candidate_labels: Sequence[str] | str, *,
        hypothesis_template: str = DEFAULT_HYPOTHESIS_TEMPLATE, multi_label: bool = False,
        timeout: float | None = None, run_id: str | None = None, chunk_size: int | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """``Client.zero_shot``: ``{"id", "labels", "scores"}`` per text, labels best first (one
        dict for one text, as the pipeline)."""
        single = isinstance(texts, str)
        values: Iterable[str | dict[str, Any]] = [texts] if isinstance(texts, str) else texts
        items = [pairs.zero_shot_item(t, candidate_labels, hypothesis_template, multi_label) for t in values]
        results = [r async for r in self._stream_through(items, run_id=run_id or jobs.new_id(), chunk_size=chunk_size,
                                                          max_pending=0, timeout=timeout)]
        # Zero-shot answers are plain dicts; stream_through is typed with ItemResult, a TypedDict,
        # which mypy does not take for dict[str, Any].
        return results[0] if single else results  # type: ignore[return-value]

    async def _stream_through(
        self, items: Iterable[Any] | AsyncIterable[Any], *, run_id: str, chunk_size: int | None = None,
        max_pending: int | None = None, timeout: float | None = None, consume: bool = True,
        on_enqueued: Callable[[int], Any] | None = None, **options: Unpack[JobOptionFields],
    ) -> AsyncIterator[ItemResult]:
        """``pairs.stream_through`` on asyncio: enqueue ``items`` as one run in a task while yielding
        their results in input order; with ``consume`` each job's results leave Redis once read."""
        failed: list[BaseException] = []

        async def produce() -> None:
            try:
                await self.enqueue_stream(items, chunk_size=chunk_size, max_pending=max_pending, run_id=run_id,
                                          on_progress=on_enqueued, **options)
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
        return await self._driver.run(self._protocol.run_progress(run_id))

    async def job_results(
        self, job_id: str, timeout: float | None = 0, item_id: str | None = None,
    ) -> list[ItemResult] | ItemResult | None:
        """A job's item results (or item ``item_id``'s: the first with that id) from RQ's result
        stream; None if not there within ``timeout`` (0: just look; None: wait for ever). Waits
        share the client's one result listener; :class:`JobFailed` if the job failed as a whole."""
        if timeout == 0:
            value = await self._driver.run(self._protocol.latest_result(job_id))
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
        (``Client.ordered_results``: the same step, with the same ``consume``/``before_delete``/
        ``timeout``; the callbacks may be coroutine functions)."""
        steps = self._protocol.ordered_results(run_id, block_ms=fit_block_ms(self.connection, 1000), timeout=timeout,
                                               consume=consume, on_idle=on_idle, before_delete=before_delete)
        async with contextlib.aclosing(self._driver.outputs(steps)) as outputs:
            async for out in outputs:
                for result in out.results:
                    yield result
