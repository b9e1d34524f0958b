"""Batching really happens, is bounded by size and tokens, and splits on out-of-memory."""

from __future__ import annotations

from producer import Client
from worker.engine import OutOfMemory, plan_batches

from helpers import run_burst


def test_hundred_single_jobs_take_at_most_five_forwards(conn, redis_server, engines):
    engine = engines["bert"]
    engine.max_batch_size = 32
    client = Client.from_url(redis_server.url)
    handles = [client.submit(f"text number {i} " + "x " * (i % 13)) for i in range(100)]
    before = engine.forward_calls
    run_burst(conn, engine, max_batch_size=32)
    assert engine.forward_calls - before <= 5
    assert all(h.result(timeout=5)["label"] for h in handles)


def test_plan_batches_respects_both_bounds():
    lengths = sorted([3] * 50 + [40] * 10 + [300])
    spans = plan_batches(lengths, max_batch_size=16, max_batch_tokens=200)
    assert [i for s, e in spans for i in range(s, e)] == list(range(len(lengths)))
    for s, e in spans:
        assert e - s <= 16
        assert (e - s) * lengths[e - 1] <= 200 or e - s == 1


def test_out_of_memory_splits_down_to_the_culprit(conn, redis_server, engines):
    engine = engines["bert"]
    engine.max_batch_size = 64

    def fault(rows: int, padded: int) -> None:
        # Any batch that contains the one very long text "runs out of memory".
        if padded >= 60 * rows and rows > 0 and padded // rows >= 60:
            raise OutOfMemory("injected: CUDA out of memory")

    texts = ["short one", "another short", "long " * 200, "tiny"]
    client = Client.from_url(redis_server.url)
    run = client.enqueue_stream(texts, chunk_size=4)
    engine.fault = fault
    try:
        run_burst(conn, engine)
    finally:
        engine.fault = None
    results = list(run.results(timeout=10))
    assert [("error" in r) for r in results] == [False, False, True, False]
    assert "out of memory" in results[2]["error"]["message"]
