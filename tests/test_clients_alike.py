"""The same scenarios through ``Client`` and ``AsyncClient``: one real redis-server, one real
``queuebert worker`` process, and each scenario written once against a :class:`Face` that calls
either client the same way (an async call is run to its end, an async iterator collected).

Both clients drive the steps of ``producer.protocol``, so these agree by construction; this test
keeps it so, and pins the drift the two hand-kept copies had (a sync ``Handle`` that had no item
index gave every item of a job with a repeated id the first one's result).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterable, Iterator
from typing import Any

import pytest
import redis

from producer import AsyncClient, Client, RedisFull, ResumeError
from producer.embedded_redis import RedisServer
from producer.jobs import JOBS_PER_ROUND_TRIP
from queuebert import keys
from queuebert.procs import stop_processes

from helpers import start_worker

QUEUE = "alike"
KINDS = ["sync", "async"]


async def _collect(values: AsyncIterable[Any]) -> list[Any]:
    return [v async for v in values]


class Face:
    """One client, sync or async, called the same way: ``face(client.method(...))`` is the value
    the call gives (awaited, or its async iterator collected; a sync iterator is listed)."""

    def __init__(self, kind: str, url: str, **settings: Any):
        self.kind = kind
        self.loop = asyncio.new_event_loop() if kind == "async" else None
        cls = AsyncClient if kind == "async" else Client
        self.client: Any = cls.from_url(url, queue=QUEUE, **settings)

    def __call__(self, value: Any) -> Any:
        if self.loop is not None and inspect.isawaitable(value):
            return self.loop.run_until_complete(value)
        if self.loop is not None and isinstance(value, AsyncIterable):
            return self.loop.run_until_complete(_collect(value))
        if isinstance(value, Iterator):
            return list(value)
        return value

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self.client.aclose())
            self.loop.close()
        else:
            self.client.connection.close()


@pytest.fixture(scope="module")
def worker(redis_server: RedisServer, tiny_models: dict[str, Any]) -> Iterator[redis.Redis]:
    """A real worker on this module's queue (no test here flushes Redis under it)."""
    admin = redis.Redis.from_url(redis_server.url)
    proc = start_worker(redis_server.url, tiny_models["bert"], "alike", QUEUEBERT_QUEUES=QUEUE)
    try:
        deadline = time.monotonic() + 180
        while admin.scard(f"rq:workers:{QUEUE}") < 1:
            assert proc.poll() is None, proc.log_path.read_text() if proc.log_path else "worker exited"
            assert time.monotonic() < deadline, "the worker did not register"
            time.sleep(0.1)
        yield admin
    finally:
        stop_processes([proc], 15)
        admin.close()


@pytest.fixture(params=KINDS)
def face(request: pytest.FixtureRequest, redis_server: RedisServer, worker: redis.Redis) -> Iterator[Face]:
    f = Face(request.param, redis_server.url)
    yield f
    f.close()


def test_each_handle_of_a_job_reads_its_own_item_when_ids_repeat(face):
    """Ids given by callers may repeat within a job: each handle reads its own item's result
    (by position), not the first with its id. ``meta`` comes back untouched, so it says whose."""
    items = [{"id": "a", "text": "the first text", "meta": 0},
             {"id": "a", "text": "a second and much longer text, with the same id", "meta": 1},
             {"id": "b", "text": "a third", "meta": 2}]
    handles = face(face.client.submit_many(items, chunk_size=3))
    assert len({h.job_id for h in handles}) == 1
    results = [face(h.result(timeout=60)) for h in handles]
    assert [r["meta"] for r in results] == [0, 1, 2]
    assert [r["id"] for r in results] == ["a", "a", "b"]
    assert [h.index for h in handles] == [0, 1, 2]


def test_one_text_submitted_alone_is_answered(face):
    handle = face(face.client.submit({"id": "solo", "text": "all alone"}, top_k=1))
    result = face(handle.result(timeout=60))
    assert result["id"] == "solo" and len(result["scores"]) == 1
    assert face(face.client.run_progress(handle.run_id))["sealed"] == 1


def test_a_stream_with_backpressure_reads_back_in_input_order_and_by_completion(face):
    n, chunk = 150, 3
    texts = [f"line {i} " + "word " * (i % 13) for i in range(n)]
    progress: list[int] = []
    run = face(face.client.enqueue_stream(texts, chunk_size=chunk, max_pending=2 * chunk, on_progress=progress.append))
    assert (run.enqueued, run.jobs, run.skipped, run.queue) == (n, n // chunk, 0, QUEUE)
    assert sum(progress) == n
    ordered = face(face.client.ordered_results(run.id, timeout=120))
    assert [r["id"] for r in ordered] == [str(i) for i in range(n)]
    completion = face(face.client.subscribe(run.id, timeout=120))
    assert sorted(r["id"] for r in completion) == sorted(str(i) for i in range(n))
    p = face(face.client.run_progress(run.id))
    assert (p["done"], p["total"], p["sealed"]) == (n, n, 1)


def test_an_interrupted_stream_resumes_where_it_stopped_and_a_sealed_one_is_only_counted(face):
    n, chunk = 200, 5
    texts = [f"resumable {i}" for i in range(n)]
    run_id = f"resume-{face.kind}"

    def failing() -> Iterator[str]:
        for i, text in enumerate(texts):
            if i == 170:
                raise OSError("input went away")
            yield text

    with pytest.raises(OSError) as info:
        face(face.client.enqueue_stream(failing(), chunk_size=chunk, run_id=run_id, max_pending=0))
    assert run_id in "".join(info.value.__notes__)
    listed = 2 * JOBS_PER_ROUND_TRIP  # two rounds went in before the input failed
    run = face(face.client.enqueue_stream(iter(texts), chunk_size=chunk, run_id=run_id, max_pending=0,
                                          keep_handles=True))
    assert (run.skipped, run.enqueued, run.jobs) == (listed * chunk, n, n // chunk)
    assert [h.item_id for h in run.handles] == [str(i) for i in range(n)]
    ordered = face(face.client.ordered_results(run_id, timeout=120))
    assert [r["id"] for r in ordered] == [str(i) for i in range(n)]
    again = face(face.client.enqueue_stream(texts, run_id=run_id))
    assert (again.skipped, again.enqueued) == (n, n)
    with pytest.raises(ResumeError):
        face(face.client.enqueue_stream(texts[:-1], run_id=run_id))


def test_a_consuming_ordered_read_leaves_only_the_runs_tombstone(face, worker):
    n = 40
    run = face(face.client.enqueue_stream([f"consumed {i}" for i in range(n)], chunk_size=4))
    flushed: list[int] = []
    ordered = face(face.client.ordered_results(run.id, timeout=120, consume=True,
                                               before_delete=lambda: flushed.append(1)))
    assert [r["id"] for r in ordered] == [str(i) for i in range(n)]
    assert flushed
    job_ids = [j.decode() for j in worker.lrange(keys.run_jobs(run.id), 0, -1)]
    assert job_ids == []  # the job list went with the rest of the run
    assert not worker.exists(keys.run_stream(run.id), keys.run_done_jobs(run.id))
    assert worker.hget(keys.run_meta(run.id), "consumed") == b"1"


def test_rerank_many_answers_each_query_in_input_order(face):
    queries = [{"id": "q1", "query": "battery life", "passages": ["lasts two days", "it rained"], "topic": "power"},
               {"id": "bad", "query": 3},
               {"query": "weather", "passages": ["sunny", "rain all week", "a draw"]}]
    answers = face(face.client.rerank_many(queries, label="bert_label_1", return_text=True, timeout=120))
    assert [a["id"] for a in answers] == ["q1", "bad", "2"]
    assert sorted(r["index"] for r in answers[0]["results"]) == [0, 1]
    assert answers[0]["meta"] == {"topic": "power"}
    assert answers[1]["error"]["type"] == "invalid_item"
    assert {r["text"] for r in answers[2]["results"]} == {"sunny", "rain all week", "a draw"}
    ranked = face(face.client.rerank("battery life", ["lasts two days", "it rained"], label="bert_label_1"))
    assert [r["index"] for r in ranked] == [r["index"] for r in answers[0]["results"]]


@pytest.mark.parametrize("kind", KINDS)
def test_a_full_redis_is_waited_out_then_reported_and_the_run_resumes(kind):
    """Redis within ``redis_headroom`` of ``maxmemory``: the stream waits for room, gives up after
    ``redis_full_timeout`` with a resumable RedisFull, and resumes once there is room."""
    with RedisServer(extra_args=["--maxmemory", str(16 * 2**20), "--maxmemory-policy", "noeviction"]) as server:
        admin = redis.Redis.from_url(server.url)
        fillers: list[str] = []  # 256 KiB at a time (a SET's own buffer counts too) to within 8%
        while admin.info("memory")["used_memory"] < 0.92 * 16 * 2**20:
            fillers.append(f"filler-{len(fillers)}")
            admin.set(fillers[-1], b"x" * 2**18)
        face = Face(kind, server.url, redis_full_timeout=0.5)
        try:
            with pytest.raises(RedisFull) as info:
                face(face.client.enqueue_stream([f"text {i}" for i in range(20)], chunk_size=2, run_id="full"))
            assert info.value.run_id == "full" and info.value.enqueued == 0
            admin.delete(*fillers)
            run = face(face.client.enqueue_stream([f"text {i}" for i in range(20)], chunk_size=2, run_id="full"))
            assert (run.enqueued, run.jobs, run.skipped) == (20, 10, 0)
            assert admin.llen(f"rq:queue:{QUEUE}") == 10
        finally:
            face.close()
            admin.close()
