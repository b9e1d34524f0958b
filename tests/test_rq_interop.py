"""Stock RQ tools see our queues, workers and jobs; a stock `rq worker` runs our jobs too."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from rq.job import Job

from producer import Client
from queuebert.job import JOB_CLASS_PATH
from queuebert.serializer import SERIALIZER_PATH

from conftest import PYTHON, REPO, subprocess_env
from helpers import run_burst

RQ = [PYTHON, "-m", "rq.cli"]


def _rq(*args: str, url: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RQ, *args, "--url", url], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


def test_rq_info_shows_queue_and_worker(conn, redis_server, tiny_models):
    client = Client.from_url(redis_server.url)
    client.submit("waiting for a worker")
    env = subprocess_env(redis_server.url, QUEUEBERT_MODEL=str(tiny_models["bert"]), QUEUEBERT_DTYPE="float32")
    worker = subprocess.Popen([PYTHON, "-m", "queuebert_cli", "worker", "--queue", "default", "--name", "qb-info-test",
                               "--log-format", "json"], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        info = ""
        while time.time() < deadline:
            info = _rq("info", url=redis_server.url).stdout
            if "qb-info-test" in info:
                break
            time.sleep(0.5)
        assert "default" in info and "qb-info-test" in info, info
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    assert worker.returncode == 0


def test_failed_job_lands_in_failed_registry_and_requeue_runs_it(conn, redis_server, engines):
    client = Client.from_url(redis_server.url)
    handles = client.submit_many(["one", "two", "three"], chunk_size=3)
    # A worker whose per-job item limit is 2 fails this 3-item job on purpose.
    run_burst(conn, engines["bert"], max_items_per_job=2)
    q = client.queue()
    job_id = handles[0].job_id
    assert job_id in q.failed_job_registry.get_job_ids()
    job = Job.fetch(job_id, connection=conn, serializer=client.queue().serializer)
    assert "3 items, more than the limit of 2" in job.latest_result().exc_string

    out = _rq("requeue", "--all", "--queue", "default", "--serializer", SERIALIZER_PATH, url=redis_server.url,
              env=subprocess_env(redis_server.url))
    assert out.returncode == 0, out.stderr
    run_burst(conn, engines["bert"])
    assert [h.result(timeout=5)["id"] for h in handles] == [h.item_id for h in handles]
    assert job_id not in q.failed_job_registry.get_job_ids()


def test_stock_rq_worker_runs_a_job_correctly(conn, redis_server, tiny_models, engines):
    client = Client.from_url(redis_server.url)
    texts = ["stock worker one", "and two, longer " * 5]
    run = client.enqueue_stream(texts, chunk_size=2)
    env = subprocess_env(redis_server.url, QUEUEBERT_MODEL=str(tiny_models["bert"]), QUEUEBERT_DTYPE="float32",
                         QUEUEBERT_DEVICE="cpu")
    out = _rq("worker", "--burst", "-w", "rq.worker.SimpleWorker", "--serializer", SERIALIZER_PATH,
              "--job-class", JOB_CLASS_PATH, "default", url=redis_server.url, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    results = list(run.results(timeout=10))
    expected = engines["bert"].classify([{"id": str(i), "text": t} for i, t in enumerate(texts)])
    assert [r["id"] for r in results] == ["0", "1"]
    for got, want in zip(results, expected):
        assert got["label"] == want["label"]
        assert abs(got["score"] - want["score"]) < 1e-5


def test_producer_does_not_import_torch():
    code = ("import sys, producer, queuebert_cli, producer.client; print(json.dumps(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch','transformers'))))")
    out = subprocess.run([sys.executable, "-c", "import json;" + code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_dependent_jobs_run_after_their_parent(conn, redis_server, engines):
    client = Client.from_url(redis_server.url)
    q = client.queue()
    parent = q.enqueue("worker.tasks.classify", kwargs={"items": [{"id": "p", "text": "parent"}]})
    child = q.enqueue("worker.tasks.classify", kwargs={"items": [{"id": "c", "text": "child"}]}, depends_on=parent)
    assert child.get_status() == "deferred"
    run_burst(conn, engines["bert"])
    run_burst(conn, engines["bert"])  # the child is enqueued when the parent completes
    child = Job.fetch(child.id, connection=conn, serializer=q.serializer)
    assert child.get_status() == "finished"
    assert child.latest_result().return_value[0]["id"] == "c"


def test_rq_worker_command_runs_the_batch_worker(conn, redis_server, tiny_models):
    """`rq worker -w worker.BatchWorker`, configured from QUEUEBERT_* variables alone."""
    client = Client.from_url(redis_server.url)
    run = client.enqueue_stream(["great product", "awful service", "fine"], chunk_size=2)
    env = subprocess_env(redis_server.url, QUEUEBERT_MODEL=str(tiny_models["bert"]), QUEUEBERT_DTYPE="float32")
    out = _rq("worker", "-w", "worker.BatchWorker", "--burst", "default", url=redis_server.url, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["id"] for r in run.results(timeout=10)] == ["0", "1", "2"]
    assert conn.hget(f"qb:run:{{{run.id}}}", "done") == b"3"
