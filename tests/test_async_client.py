"""AsyncClient: the jobs it writes are Client's, byte for byte; concurrent submits share jobs and
results reach a thousand waiters over a few connections; subscriptions resume without loss or
repeats; streams take async iterables and wait for room.

The event loop runs in a thread of its own and the tests' BatchWorker bursts run in the main
thread (RQ installs signal handlers, which only the main thread may do), so jobs are processed
while coroutines wait for them, as with a real worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

import producer.jobs
from producer import AsyncClient, Client, ResumeError
from producer.jobs import JOBS_PER_ROUND_TRIP
from queuebert import keys
from queuebert.connection import connect_async
from queuebert.procs import stop_processes
from queuebert.schema import JobOptions
from queuebert.settings import ClientSettings

from helpers import run_burst, start_worker

QUEUE_KEY = "rq:queue:default"


@pytest.fixture()
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own."""
    ev = asyncio.new_event_loop()
    thread = threading.Thread(target=ev.run_forever, name="test-loop", daemon=True)
    thread.start()
    yield ev
    ev.call_soon_threadsafe(ev.stop)
    thread.join(timeout=10)
    ev.close()


def in_loop(ev: asyncio.AbstractEventLoop, coro: Awaitable[Any]) -> Future[Any]:
    return asyncio.run_coroutine_threadsafe(coro, ev)  # type: ignore[arg-type]


def drive(ev: asyncio.AbstractEventLoop, coro: Awaitable[Any], conn: redis.Redis, engine: Any,
          timeout: float = 120.0, **worker: Any) -> Any:
    """Run ``coro`` in the loop while this thread works the queue in bursts until it ends."""
    fut = in_loop(ev, coro)
    deadline = time.monotonic() + timeout
    while not fut.done():
        assert time.monotonic() < deadline, "the coroutine did not finish"
        run_burst(conn, engine, **worker)
        time.sleep(0.005)
    return fut.result()


def wait_until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def async_client(url: str, name: str = "qb-async-test", **overrides: Any) -> AsyncClient:
    """An AsyncClient whose connections carry ``name`` in CLIENT LIST."""
    return AsyncClient(connect_async(url, client_name=name), ClientSettings.from_env(redis_url=url, **overrides))


async def close(client: AsyncClient) -> None:
    """Close the client and the connection it was given (AsyncClient closes only one it opened)."""
    await client.aclose()
    await client.connection.aclose()


def client_ids(conn: redis.Redis, name: str) -> list[int]:
    return [int(c["id"]) for c in conn.client_list() if c.get("name") == name]


# -- byte for byte ----------------------------------------------------------------------------

#: What must differ between two enqueues made at different moments, and only that: RQ's
#: ``created_at`` / ``enqueued_at`` (UTC strings) in job hashes, the run's ``created_at`` (Unix
#: time) in its meta hash, and the run's score (creation time) in ``qb:runs``.
_TIME_FIELDS = {b"created_at", b"enqueued_at"}


def snapshot(conn: redis.Redis) -> dict[str, tuple[str, Any, bool]]:
    """Every key: its type, its content (raw bytes, times normalised) and whether it expires."""
    out: dict[str, tuple[str, Any, bool]] = {}
    for key in conn.keys("*"):
        kind = conn.type(key).decode()
        content: Any
        if kind == "hash":
            content = {f: (b"<time>" if f in _TIME_FIELDS else v) for f, v in conn.hgetall(key).items()}
        elif kind == "list":
            content = conn.lrange(key, 0, -1)
        elif kind == "set":
            content = conn.smembers(key)
        elif kind == "zset":
            content = [member for member, _score in conn.zrange(key, 0, -1, withscores=True)]
        elif kind == "string":
            content = conn.get(key)
        else:
            raise AssertionError(f"unexpected {kind} {key!r}")
        out[key.decode()] = (kind, content, conn.ttl(key) > 0)
    return out


def test_jobs_match_client_byte_for_byte(conn, redis_server, loop, monkeypatch):
    counter: list[Iterator[int]] = [itertools.count()]

    def fake_id() -> str:
        return f"id{next(counter[0]):04d}"

    monkeypatch.setattr(producer.jobs, "new_id", fake_id)  # every id either client draws
    pair = {"id": "p", "text": "query", "meta": {"row": 7}}
    many = [f"many {i}" for i in range(11)]
    stream = [{"text": f"stream {i} " + "é" * i, "meta": i} for i in range(70)]
    batch = [{"id": f"b{i}", "text": f"batch {i}"} for i in range(5)]

    client = Client.from_url(redis_server.url, job_ttl=None)
    client.submit("one text")
    client.submit(pair, text_pair="passage", top_k=2, queue="other")
    client.submit_many(many, chunk_size=3, run_id="run-many")
    client.enqueue_stream(iter(stream), chunk_size=4, run_id="run-stream", max_pending=0)
    # What AsyncClient sends for 5 gathered submits: one job of 5 items in a fresh, sealed run
    # (each submit draws an item id first, unused when the item has one, as Client.submit does).
    for _ in batch:
        producer.jobs.new_id()
    client._enqueue_run([batch], None, JobOptions(), producer.jobs.new_id())
    written_by_client = snapshot(conn)
    assert sum(k.startswith("rq:job:") for k in written_by_client) == 2 + 4 + 18 + 1

    conn.flushall()
    counter[0] = itertools.count()

    async def enqueue() -> None:
        async with AsyncClient.from_url(redis_server.url, coalesce_ms=0, job_ttl=None) as ac:
            await ac.submit("one text")
            await ac.submit(pair, text_pair="passage", top_k=2, queue="other")
            await ac.submit_many(many, chunk_size=3, run_id="run-many")

            async def items() -> Any:
                for item in stream:
                    yield item

            await ac.enqueue_stream(items(), chunk_size=4, run_id="run-stream", max_pending=0)
        async with AsyncClient.from_url(redis_server.url, coalesce_ms=10_000, chunk_size=len(batch)) as ac:
            await asyncio.gather(*(ac.submit(item) for item in batch))
            assert ac.coalesced == {"batches": 1, "jobs": 1, "items": len(batch)}

    in_loop(loop, enqueue()).result(timeout=60)
    written_by_async = snapshot(conn)
    assert written_by_async.keys() == written_by_client.keys()
    for key, value in written_by_client.items():
        assert written_by_async[key] == value, key


# -- many concurrent one-text requests --------------------------------------------------------

def test_thousand_concurrent_submits_share_jobs_and_connections(conn, redis_server, engines, loop):
    n = 1000
    name = "qb-async-1000"
    engine = engines["bert"]
    texts = [f"request {i} " + "word " * (i % 17) for i in range(n)]
    forwards_before = engine.forward_calls
    peak: list[int] = [0]
    stats: dict[str, int] = {}

    async def scenario() -> list[Any]:
        client = async_client(redis_server.url, name)
        done = asyncio.Event()

        async def watch_connections() -> None:
            probe = redis.asyncio.Redis.from_url(redis_server.url)
            while not done.is_set():
                listed = await probe.client_list()
                peak[0] = max(peak[0], sum(1 for c in listed if c.get("name") == name))
                await asyncio.sleep(0.01)
            await probe.aclose()

        async def one(text: str) -> tuple[str, Any]:
            handle = await client.submit(text)
            return handle.item_id, await handle.result(timeout=120)

        watcher = asyncio.create_task(watch_connections())
        try:
            return await asyncio.gather(*(one(t) for t in texts))
        finally:
            done.set()
            await watcher
            stats.update(client.coalesced, reads=client._listener.reads)
            await close(client)

    results = drive(loop, scenario(), conn, engine)
    assert len(results) == n
    assert all(r is not None and r["id"] == item_id and r["label"] for item_id, r in results)
    jobs_made = len(conn.keys("rq:job:*"))
    assert stats["items"] == n and stats["jobs"] == jobs_made
    # Gathered into jobs of up to chunk_size (64): a tenth of one job per request is generous.
    assert jobs_made <= n // 10, f"{jobs_made} jobs for {n} submits"
    assert 0 < peak[0] <= 32, f"{peak[0]} connections"
    print(f"\n{n} concurrent submit+result: {jobs_made} jobs, {stats['batches']} gathered batches, "
          f"{engine.forward_calls - forwards_before} forwards, peak {peak[0]} client connections, "
          f"{stats['reads']} listener XREADs")


def test_result_waits_time_out_are_cancelled_ride_out_a_lost_connection_and_see_earlier_results(
        conn, redis_server, engines, loop):
    name = "qb-async-wait"
    async def submit_two() -> tuple[AsyncClient, list[Any]]:
        client = async_client(redis_server.url, name, coalesce_ms=0)
        return client, [await client.submit("early"), await client.submit("late")]

    client, (early, late) = in_loop(loop, submit_two()).result(timeout=30)

    async def nobody_works() -> None:
        assert await late.result(timeout=0) is None
        assert await late.result(timeout=0.2) is None  # no worker yet
        waiter = asyncio.create_task(late.result(timeout=None))
        await asyncio.sleep(0.1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert client._listener.waiters == {}  # the cancelled and timed-out waiters left

    in_loop(loop, nobody_works()).result(timeout=30)

    # A waiter blocked in the listener's XREAD while every connection of the client is dropped.
    waiting = in_loop(loop, late.result(timeout=60))
    wait_until(lambda: client._listener.in_xread and client._listener.reads > 0)
    for client_id in client_ids(conn, name):
        conn.client_kill_filter(_id=client_id)
    time.sleep(0.2)
    assert not waiting.done()
    run_burst(conn, engines["bert"])  # both finish; nobody waits for "early" yet
    assert waiting.result(timeout=30)["id"] == late.item_id

    async def after() -> None:
        result = await early.result(timeout=5)
        assert result is not None and result["id"] == early.item_id
        assert (await late.result(timeout=5))["id"] == late.item_id
        await close(client)

    in_loop(loop, after()).result(timeout=30)


# -- subscriptions ----------------------------------------------------------------------------

def test_subscriber_cancelled_then_disconnected_misses_nothing_and_sees_nothing_twice(conn, redis_server,
                                                                                       engines, loop):
    engine = engines["bert"]
    run_id = "sub-run"
    texts = [f"line {i}" for i in range(60)]
    Client.from_url(redis_server.url).enqueue_stream(texts, chunk_size=3, run_id=run_id, max_pending=0)
    held = conn.lrange(QUEUE_KEY, 0, -1)  # 20 jobs, handed to the worker a third at a time
    conn.delete(QUEUE_KEY)

    def release(job_ids: list[bytes]) -> None:
        conn.rpush(QUEUE_KEY, *job_ids)
        run_burst(conn, engine)

    name = "qb-async-sub"
    client = async_client(redis_server.url, name)
    seen: list[str] = []
    state: dict[str, Any] = {}
    stopped = threading.Event()

    async def read(last_id: str | None) -> None:
        sub = client.subscribe(run_id, last_id=last_id)
        try:
            async for result in sub:
                seen.append(result["id"])
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise
        finally:
            state["last_id"] = sub.last_id
            stopped.set()

    release(held[:7])
    first = in_loop(loop, read(None))
    wait_until(lambda: len(seen) == 21)
    time.sleep(0.1)  # blocked in XREAD for what is not done yet
    first.cancel()
    assert stopped.wait(10) and state["cancelled"]
    assert sorted(seen, key=int) == [str(i) for i in range(21)]

    release(held[7:14])  # done while nobody listens
    second = in_loop(loop, read(state["last_id"]))
    wait_until(lambda: len(seen) == 42)
    time.sleep(0.1)
    for client_id in client_ids(conn, name):  # drop its connection while it blocks
        conn.client_kill_filter(_id=client_id)
    release(held[14:])
    second.result(timeout=30)  # ends by itself: the run is sealed and done
    assert sorted(seen, key=int) == [str(i) for i in range(60)]
    assert len(seen) == len(set(seen)) == 60
    in_loop(loop, close(client)).result(timeout=10)


# -- streams ----------------------------------------------------------------------------------

def test_enqueue_stream_takes_an_async_generator_and_waits_for_room(conn, redis_server, engines, loop):
    engine = engines["bert"]
    n, chunk, max_pending = 300, 5, 20
    round_items = JOBS_PER_ROUND_TRIP * chunk
    produced: list[int] = []

    async def lines() -> Any:
        for i in range(n):
            produced.append(i)
            yield {"text": f"stream line {i} " + "x " * (i % 11)}
            await asyncio.sleep(0)

    client = async_client(redis_server.url)
    enqueue = in_loop(loop, client.enqueue_stream(lines(), chunk_size=chunk, max_pending=max_pending,
                                                  run_id="bp-run"))
    # No worker yet: the stream stops after its first round, which put it over max_pending.
    wait_until(lambda: int(conn.hget(keys.run_meta("bp-run"), "enqueued") or 0) == round_items)
    time.sleep(0.5)
    assert not enqueue.done()
    assert int(conn.hget(keys.run_meta("bp-run"), "enqueued")) == round_items
    assert len(produced) <= round_items + 1

    # Reverse the queue so that jobs complete against input order: the ordered read must reorder.
    def work_backwards() -> None:
        queued = conn.lrange(QUEUE_KEY, 0, -1)
        if queued:
            conn.delete(QUEUE_KEY)
            conn.rpush(QUEUE_KEY, *reversed(queued))
        run_burst(conn, engine)

    deadline = time.monotonic() + 120
    while not enqueue.done():
        assert time.monotonic() < deadline
        work_backwards()
    run = enqueue.result()
    assert (run.enqueued, run.jobs) == (n, n // chunk)
    work_backwards()

    async def read() -> tuple[list[str], list[str]]:
        completion = [r["id"] async for r in client.subscribe(run.id, timeout=30)]
        ordered = [r["id"] async for r in client.ordered_results(run.id, timeout=30)]
        assert (await client.run_progress(run.id))["done"] == n
        await close(client)
        return completion, ordered

    completion, ordered = in_loop(loop, read()).result(timeout=60)
    assert ordered == [str(i) for i in range(n)]
    assert sorted(completion, key=int) == ordered and completion != ordered


def test_interrupted_async_stream_resumes_once_and_client_sees_the_same_run(conn, redis_server, loop):
    n, chunk = 200, 5
    texts = [f"resumable {i}" for i in range(n)]

    async def failing() -> Any:
        for i, t in enumerate(texts):
            if i == 170:
                raise OSError("input went away")
            yield t

    async def scenario() -> Any:
        async with AsyncClient.from_url(redis_server.url) as client:
            with pytest.raises(OSError) as info:
                await client.enqueue_stream(failing(), chunk_size=chunk, run_id="resume-run", max_pending=0)
            assert "resume-run" in "".join(info.value.__notes__)
            run = await client.enqueue_stream(iter(texts), chunk_size=chunk, run_id="resume-run", max_pending=0)
            with pytest.raises(ResumeError):
                await client.enqueue_stream(iter(texts[:-1]), run_id="resume-run")
            return run

    run = in_loop(loop, scenario()).result(timeout=60)
    listed = 2 * JOBS_PER_ROUND_TRIP  # two rounds went in before the input failed
    assert (run.skipped, run.enqueued, run.jobs) == (listed * chunk, n, n // chunk)
    # The synchronous client resumes the same run: nothing is left to send.
    again = Client.from_url(redis_server.url).enqueue_stream(texts, run_id="resume-run")
    assert again.skipped == n
    items = []
    for job_id in conn.lrange(keys.run_jobs("resume-run"), 0, -1):
        data = conn.hget(f"rq:job:{job_id.decode()}", "data")
        items.extend(re.findall(rb'"text":"(resumable \d+)"', zlib.decompress(data)))
    assert [t.decode() for t in items] == texts


# -- pairs ------------------------------------------------------------------------------------

def test_rerank_and_zero_shot_answer_as_the_sync_client(conn, redis_server, engines, loop, tolerance):
    passages = ["the battery lasts two days", "it rained all week", "charging takes an hour"]
    labels = ["battery", "weather", "sports"]
    sync = Client.from_url(redis_server.url)

    async def ask(kind: str) -> Any:
        async with AsyncClient.from_url(redis_server.url) as client:
            if kind == "rerank":
                return await client.rerank("how long does the battery last", passages, return_text=True)
            return await client.zero_shot(["the battery died", "a sunny day"], labels)

    async_rank = drive(loop, ask("rerank"), conn, engines["crossencoder"])
    expected = {}

    def sync_rank() -> None:
        expected["rerank"] = sync.rerank("how long does the battery last", passages, return_text=True, timeout=60)

    worker_thread = threading.Thread(target=sync_rank)
    worker_thread.start()
    while worker_thread.is_alive():
        run_burst(conn, engines["crossencoder"])
        time.sleep(0.01)
    assert [r["index"] for r in async_rank] == [r["index"] for r in expected["rerank"]]
    assert [r["score"] for r in async_rank] == pytest.approx([r["score"] for r in expected["rerank"]], abs=tolerance)
    assert async_rank[0]["text"] in passages

    answers = drive(loop, ask("zero-shot"), conn, engines["nli"])
    assert [a["id"] for a in answers] == ["0", "1"]
    assert all(sorted(a["labels"]) == sorted(labels) for a in answers)
    assert all(abs(sum(a["scores"]) - 1) < 1e-5 for a in answers)


@pytest.mark.parametrize("unblock", ["allowed", "refused"])
def test_a_newly_awaited_job_is_read_without_waiting_out_the_blocked_read(conn, redis_server, engines, loop,
                                                                          unblock):
    url = redis_server.url
    if unblock == "refused":  # as managed services that deny CLIENT UNBLOCK: the listener polls instead
        conn.execute_command("ACL", "SETUSER", "no-unblock", "on", "nopass", "~*", "&*", "+@all", "-client|unblock")
        url = url.replace("redis://", "redis://no-unblock:x@")

    async def submit(text: str, client: AsyncClient | None = None) -> Any:
        client = client or async_client(url, coalesce_ms=0)
        return client, await client.submit(text)

    client, done_early = in_loop(loop, submit("done early")).result(timeout=30)
    run_burst(conn, engines["bert"])
    _, never_done = in_loop(loop, submit("never done", client)).result(timeout=30)

    async def scenario() -> None:
        listener = client._listener
        if unblock == "allowed":
            listener.BLOCK_MS = 600_000  # only an UNBLOCK can end this read in time
        blocked = asyncio.create_task(never_done.result(timeout=None))
        while not listener.in_xread:
            await asyncio.sleep(0.001)
        reads = listener.reads
        result = await done_early.result(timeout=30)
        assert result is not None and result["id"] == done_early.item_id
        assert listener.reads > reads
        assert listener.can_unblock is (unblock == "allowed")
        blocked.cancel()
        await close(client)

    in_loop(loop, scenario()).result(timeout=60)
    if unblock == "refused":
        conn.execute_command("ACL", "DELUSER", "no-unblock")


def test_more_concurrent_sends_than_connections_wait_for_one(conn, redis_server, loop):
    """Without coalescing every submit is a round trip of its own; past the pool's size they queue
    for a connection (redis.asyncio's default pool fails them with "Too many connections")."""
    n, limit = 500, 8

    async def scenario() -> list[Any]:
        async with AsyncClient.from_url(redis_server.url, coalesce_ms=0, max_connections=limit) as client:
            return await asyncio.gather(*(client.submit(f"one of many {i}") for i in range(n)))

    handles = in_loop(loop, scenario()).result(timeout=120)
    assert len({h.job_id for h in handles}) == n
    assert conn.llen(QUEUE_KEY) == n


def test_coalescing_gathers_longer_while_the_queue_has_a_backlog(redis_server, conn):
    """Submits ~5 ms apart (HTTP requests handled one after another): past the 2 ms window each
    would be its own job; once a send found the queue holding unstarted jobs (no worker waiting),
    the window is coalesce_max_ms and they share jobs."""

    async def spaced(max_ms: float) -> dict[str, int]:
        async with AsyncClient.from_url(redis_server.url, queue=f"spaced-{max_ms:g}", coalesce_ms=2,
                                        coalesce_max_ms=max_ms) as client:
            await client.submit("first")  # sent alone: nothing queued before it
            for i in range(6):
                asyncio.ensure_future(client.submit(f"text {i}"))
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            return client.coalesced

    adaptive = asyncio.run(spaced(30))
    fixed = asyncio.run(spaced(0))
    assert fixed["items"] == adaptive["items"] == 7
    assert fixed["jobs"] == 7
    assert adaptive["jobs"] <= 3, adaptive


@pytest.mark.parametrize("workers_listed", [1, 2])
def test_submits_wait_for_an_awaited_result_only_while_every_worker_has_work(
        conn, redis_server, engines, loop, workers_listed):
    """Nagle for jobs: while this client awaits as many jobs as workers serve the queue (or the
    queue holds unstarted jobs), new submits are held (here up to a minute) and go as one job the
    moment a result arrives; with a worker to spare a submit goes after the short window.

    A thread waits on the queue as an idle worker does, so "first" is taken as it is pushed and
    the queue shows no backlog: only the awaited job can hold what follows."""
    queue = f"nagle-{workers_listed}"
    listed = [f"rq:worker:listed-{i}" for i in range(workers_listed)]
    conn.sadd(f"rq:workers:{queue}", *listed)
    taken: list[Any] = []
    waiter = threading.Thread(target=lambda: taken.append(conn.blpop([f"rq:queue:{queue}"], timeout=30)))
    waiter.start()
    wait_until(lambda: any(c.get("cmd") == "blpop" for c in conn.client_list()))

    async def scenario() -> tuple[dict[str, int], dict[str, int], list[Any]]:
        client = async_client(redis_server.url, f"qb-{queue}", queue=queue, coalesce_ms=2, coalesce_max_ms=60_000)
        first = await client.submit("the first, awaited")
        waiting = asyncio.ensure_future(first.result(timeout=120))
        later = []
        for i in range(5):  # 50 ms apart: far past the 2 ms window even on a loaded machine
            later.append(asyncio.ensure_future(client.submit(f"later {i}")))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        before = dict(client.coalesced)
        handles = await asyncio.gather(*later)  # sent once the first result arrives, if held
        after = dict(client.coalesced)
        results = [await waiting] + [await h.result(timeout=120) for h in handles]
        await close(client)
        return before, after, results

    fut = in_loop(loop, scenario())
    time.sleep(1.0)  # past the scenario's 350 ms, so "before" is read while "first" is still held
    assert not fut.done()
    conn.srem(f"rq:workers:{queue}", *listed)
    waiter.join()
    conn.lpush(f"rq:queue:{queue}", taken[0][1])  # back to the queue, for the real worker
    deadline = time.monotonic() + 120
    while not fut.done():
        assert time.monotonic() < deadline
        run_burst(conn, engines["bert"], queues=[queue])
        time.sleep(0.005)
    before, after, results = fut.result()
    assert all(r is not None and r["label"] for r in results) and len(results) == 6
    if workers_listed == 1:
        # The one worker had "first": the rest were held through 50 ms gaps and the 100 ms after,
        # then sent together when its result came.
        assert before == {"batches": 1, "jobs": 1, "items": 1}
        assert after == {"batches": 2, "jobs": 2, "items": 6}
    else:
        # A worker was free: "later 0" went after 2 ms on its own. It stayed queued (nobody else
        # waits on the queue here), so the rest were held until a result came.
        assert before == {"batches": 2, "jobs": 2, "items": 2}
        assert after == {"batches": 3, "jobs": 3, "items": 6}


@contextlib.contextmanager
def slowed_worker(conn: redis.Redis, url: str, model: Path, queue: str, forward_s: float) -> Iterator[None]:
    """One real worker on ``queue`` (blocked on it while idle, so a client sending then sees no
    backlog) whose forwards take ``forward_s``, as a CPU forward of ~32 texts does."""
    proc = start_worker(url, model, f"slowed-{queue}", forward_s=forward_s, QUEUEBERT_QUEUES=queue)
    try:
        wait_until(lambda: conn.scard(f"rq:workers:{queue}") == 1, timeout=120)
        yield
    finally:
        stop_processes([proc], 15)


def test_closed_loop_submitters_come_back_together_as_one_job(conn, redis_server, tiny_models):
    """Closed-loop load (HTTP clients each sending a new request when its answer comes back):
    answers reach their clients one by one, each client sends again some milliseconds later (here
    0, 10, 20 and 30 ms). Sent as it arrived, the first would go alone and the rest would be held
    behind it, and the two parts would alternate from then on. Once the client has seen its
    submits crowd in just after results, the submitters of arrived results are gathered into one
    job, and what arrives while the worker has its job waits for that job's answers."""
    queue = "closed-loop"
    rounds, users = 10, 4

    async def scenario() -> list[str]:
        client = async_client(redis_server.url, f"qb-{queue}", queue=queue, coalesce_ms=2, coalesce_max_ms=100)
        sent: list[str] = []  # the job of each submit, in the order the submits returned

        async def user(i: int) -> None:
            for r in range(rounds):
                handle = await client.submit(f"user {i} round {r}")
                sent.append(handle.job_id)
                assert (await handle.result(timeout=120))["label"]
                await asyncio.sleep(0.01 * i)  # the answer reaches this client i x 10 ms later

        await asyncio.gather(*(user(i) for i in range(users)))
        await close(client)
        return sent

    with slowed_worker(conn, redis_server.url, tiny_models["bert"], queue, 0.3):
        sent = asyncio.run(scenario())
    sizes = [sent.count(j) for j in dict.fromkeys(sent)]
    assert sizes[0] == users  # sent together: one job
    # Then the one that came back first went alone and the rest were held behind it: 1, 3, 1, 3.
    # Settled within a few rounds, each job carries every user again. (The last may carry fewer:
    # a user that went alone early is a round ahead and finishes first.)
    assert sizes[-4:-1] == [users] * 3, sizes


def test_open_loop_submits_are_not_held_for_submitters_that_do_not_come_back(conn, redis_server, tiny_models):
    """Open-loop load (a request every 25 ms whatever the answers do): a submit is held no longer
    than coalesce_max_ms behind a busy worker, as before any result arrived. Judged closed-loop,
    submits would wait for the answers of the job in flight (~600 ms here). (How the traffic is
    judged is tested on scripted arrivals in test_coalescing.py.)"""
    queue = "open-loop"

    async def scenario() -> list[float]:
        client = async_client(redis_server.url, f"qb-{queue}", queue=queue, coalesce_ms=2, coalesce_max_ms=100)
        held: list[float] = []

        async def request(i: int) -> None:
            t = time.monotonic()
            handle = await client.submit(f"request {i}")
            held.append(time.monotonic() - t)
            assert (await handle.result(timeout=120))["label"]

        tasks = []
        for i in range(100):
            tasks.append(asyncio.ensure_future(request(i)))
            await asyncio.sleep(0.025)
        await asyncio.gather(*tasks)
        await close(client)
        return held

    with slowed_worker(conn, redis_server.url, tiny_models["bert"], queue, 0.6):
        held = asyncio.run(scenario())
    assert max(held) < 0.4, sorted(held)[-5:]
