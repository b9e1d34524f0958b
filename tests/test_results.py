"""Polling and subscribing return every item exactly once; a resumed subscriber misses nothing."""

from __future__ import annotations

import threading

from producer import Client

from helpers import run_burst


def test_thousand_items_poll_and_subscribe(conn, redis_server, engines):
    client = Client.from_url(redis_server.url)
    texts = [f"item {i} " + "word " * (i % 17) for i in range(1000)]
    run = client.enqueue_stream(texts, chunk_size=10)
    half: list = []
    sub = client.subscribe(run.id)

    # A subscriber that reads half the results, disconnects, and resumes from its last id.
    def first_half() -> None:
        for _entry_id, _job, results in sub.entries():
            half.extend(results)
            if len(half) >= 500:
                return

    reader = threading.Thread(target=first_half)
    reader.start()
    run_burst(conn, engines["bert"])
    reader.join(timeout=30)
    resumed = list(client.subscribe(run.id, last_id=sub.last_id, timeout=10))
    subscribed_ids = [r["id"] for r in half + resumed]
    assert sorted(subscribed_ids, key=int) == [str(i) for i in range(1000)]
    assert len(subscribed_ids) == len(set(subscribed_ids)) == 1000

    polled = list(run.results(timeout=10))
    assert [r["id"] for r in polled] == [str(i) for i in range(1000)]
    assert run.progress()["done"] == 1000 and run.is_done()


def test_handle_result_timeout_zero_returns_nothing_yet(conn, redis_server, engines):
    client = Client.from_url(redis_server.url)
    handle = client.submit({"id": "only", "text": "not processed yet"})
    assert handle.result(timeout=0) is None
    run_burst(conn, engines["bert"])
    assert handle.result(timeout=0)["id"] == "only"


def test_redelivered_job_is_counted_once(conn, redis_server, engines):
    """A job that ran twice (its first worker died after computing) appears once in the run."""
    from queuebert.results import record_job

    client = Client.from_url(redis_server.url)
    run = client.enqueue_stream(["a", "b"], chunk_size=2)
    run_burst(conn, engines["bert"])
    job_id = conn.lrange(f"qb:run:{{{run.id}}}:jobs", 0, -1)[0].decode()
    with conn.pipeline() as pipe:
        record_job(conn, pipe, run.id, job_id, [{"id": "0", "label": "x", "score": 1.0, "scores": {}}])
        pipe.execute()
    assert [r["id"] for r in client.subscribe(run.id, timeout=5)] == ["0", "1"]
    assert run.progress()["done"] == 2
