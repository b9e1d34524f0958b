"""Bad input gets a clear error and loses nothing else."""

from __future__ import annotations

import pickle
import zlib

from rq import Queue
from rq.job import Job

from producer import Client
from queuebert.serializer import JSONSerializer

from helpers import run_burst


def test_bad_items_fail_alone(conn, redis_server, engines):
    client = Client.from_url(redis_server.url)
    q = client.queue()
    items = [
        {"id": "ok1", "text": "fine"},
        {"id": "none", "text": None},
        {"id": "num", "text": 42},
        {"id": "surrogate", "text": "bad \ud800 half"},
        {"id": "ctrl", "text": "\x00\x01\x02 control"},
        {"id": "huge", "text": "x" * 300_000},
        "not an object",
        {"id": "ok2", "text": "also fine"},
    ]
    job = q.enqueue("worker.tasks.classify", kwargs={"items": items})
    run_burst(conn, engines["bert"])
    job = Job.fetch(job.id, connection=conn, serializer=JSONSerializer)
    results = job.latest_result().return_value
    by_id = {r["id"]: r for r in results}
    assert "error" not in by_id["ok1"] and "error" not in by_id["ok2"] and "error" not in by_id["ctrl"]
    assert by_id["none"]["error"]["type"] == "invalid_text"
    assert by_id["num"]["error"]["type"] == "invalid_text"
    assert by_id["surrogate"]["error"]["type"] == "invalid_text"
    assert by_id["huge"]["error"]["type"] == "text_too_long"
    assert results[6]["error"]["type"] == "invalid_item"
    assert len(results) == len(items)


def test_pickled_job_is_refused_never_run(conn, redis_server, engines):
    marker = "qb:test:pickle-ran"
    q = Queue("default", connection=conn)  # RQ's default serializer: pickle
    job = q.enqueue("os.system", f"redis-cli -p {redis_server.port} set {marker} 1")
    raw = zlib.decompress(conn.hget(job.key, "data"))
    assert raw[:1] == b"\x80" and pickle.loads(raw)
    run_burst(conn, engines["bert"])
    assert conn.get(marker) is None
    failed = q.failed_job_registry.get_job_ids()
    assert job.id in failed


def test_malformed_and_empty_jobs_fail_clearly(conn, redis_server, engines):
    client = Client.from_url(redis_server.url)
    q = client.queue()
    empty = q.enqueue("worker.tasks.classify", kwargs={"items": []})
    wrong = q.enqueue("worker.tasks.classify", kwargs={"texts": ["x"]})
    good = client.submit("still works")
    run_burst(conn, engines["bert"])
    assert empty.id in q.failed_job_registry.get_job_ids()
    assert wrong.id in q.failed_job_registry.get_job_ids()
    exc = Job.fetch(empty.id, connection=conn, serializer=JSONSerializer).latest_result().exc_string
    assert "no items" in exc
    assert good.result(timeout=5)["label"]


def test_huge_job_and_megabyte_text(conn, redis_server, engines):
    client = Client.from_url(redis_server.url)
    q = client.queue()
    huge = q.enqueue("worker.tasks.classify", kwargs={"items": [{"id": str(i), "text": "x"} for i in range(100_000)]})
    big_text = client.submit({"id": "mb", "text": "word " * 210_000})  # ~1 MB
    neighbour = client.submit("a normal neighbour")
    run_burst(conn, engines["bert"])
    assert huge.id in q.failed_job_registry.get_job_ids()
    exc = Job.fetch(huge.id, connection=conn, serializer=JSONSerializer).latest_result().exc_string
    assert "100000 items, more than the limit of 10000" in exc
    assert big_text.result(timeout=5)["error"]["type"] == "text_too_long"
    assert neighbour.result(timeout=5)["label"]
