"""A Redis writer cannot make a worker run anything but queuebert's own function and callback.

The jobs here are written the way anyone who can write to Redis could write them: through RQ's API
with RQ's *own* JSON serializer (same wire format as queuebert's), naming ``os.system`` or a module
that leaves marker files when it is imported or called. A stock ``rq worker`` started as the README
says must refuse every one of them, without importing the names, and fail the jobs with a reason.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Callback, Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer as RQJSONSerializer
from rq.webhook import Webhook

from queuebert import keys
from queuebert.job import JOB_CLASS_PATH, QueuebertJob
from queuebert.serializer import SERIALIZER_PATH, ForeignJobError, JSONSerializer

from conftest import PYTHON, REPO, subprocess_env

EVIL_MODULE = '''
import os, pathlib
pathlib.Path(os.environ["QB_EVIL_DIR"], "imported").touch()

def hook(*args, **kwargs):
    pathlib.Path(os.environ["QB_EVIL_DIR"], "called").touch()
'''


@pytest.fixture()
def evil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module ``qb_evil`` that touches files in the returned folder when it is
    imported and when its ``hook`` is called; importable in this process and in subprocesses."""
    (tmp_path / "qb_evil.py").write_text(EVIL_MODULE)
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("QB_EVIL_DIR", str(markers))
    monkeypatch.delitem(sys.modules, "qb_evil", raising=False)
    return markers


@pytest.fixture()
def http_hits() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server that records every request path (for webhooks nobody should send)."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def _attacker_queue(conn: redis.Redis) -> Queue:
    return Queue("default", connection=conn, serializer=RQJSONSerializer)


def _plant_abandoned(conn: redis.Redis, on_failure: str) -> Job:
    """A job that looks taken by a worker that died: status started, expired in the started registry.
    Every worker's maintenance (and BatchWorker's recovery) runs its failure callback."""
    q = _attacker_queue(conn)
    job = q.enqueue(keys.JOB_FUNC, kwargs={"items": [{"id": "x", "text": "x"}]}, on_failure=Callback(on_failure))
    q.remove(job.id)
    conn.hset(job.key, "status", JobStatus.STARTED.value)
    conn.zadd(q.started_job_registry.key, {f"{job.id}:dead-execution": 1})
    return job


def _exc_string(conn: redis.Redis, job_id: str) -> str:
    result = Job.fetch(job_id, connection=conn, serializer=JSONSerializer).latest_result()
    return result.exc_string if result is not None else ""


def test_stock_rq_worker_refuses_foreign_function_callbacks_and_webhooks(conn, redis_server, evil, http_hits):
    url, hits = http_hits
    q = _attacker_queue(conn)
    shell = q.enqueue("os.system", f"touch {evil}/os-system",
                      webhooks=[Webhook(f"{url}/failed", "failed"), Webhook(f"{url}/finished", "finished")])
    # An empty job fails in classify, which would then import and call its failure callback.
    on_failure = q.enqueue(keys.JOB_FUNC, kwargs={"items": []}, on_failure=Callback("qb_evil.hook"))
    # A job past its deadline succeeds without a model, which would then call its success callback.
    on_success = q.enqueue(keys.JOB_FUNC, kwargs={"items": [{"id": "a", "text": "x"}], "deadline": 1.0},
                           on_success=Callback("qb_evil.hook"))
    abandoned = _plant_abandoned(conn, "qb_evil.hook")

    env = subprocess_env(redis_server.url, QB_EVIL_DIR=str(evil))
    env["PYTHONPATH"] = f"{REPO}:{evil.parent}"
    out = subprocess.run([PYTHON, "-m", "rq.cli", "worker", "--burst", "--serializer", SERIALIZER_PATH,
                          "--job-class", JOB_CLASS_PATH, "--url", redis_server.url, "default"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]

    assert sorted(p.name for p in evil.iterdir()) == [], out.stderr[-3000:]
    assert hits == []
    for job in (shell, on_failure, on_success, abandoned):
        assert Job.fetch(job.id, connection=conn, serializer=JSONSerializer).get_status() == JobStatus.FAILED
    shell_exc = _exc_string(conn, shell.id)
    assert "ForeignJobError" in shell_exc and "'os.system'" in shell_exc and keys.JOB_FUNC in shell_exc
    assert "failure callback 'qb_evil.hook'" in _exc_string(conn, on_failure.id)
    assert "success callback 'qb_evil.hook'" in _exc_string(conn, on_success.id)


def test_serializer_alone_refuses_a_foreign_function(conn, redis_server, evil):
    """Even a stock worker started without ``--job-class`` never runs a function the job names."""
    q = _attacker_queue(conn)
    job = q.enqueue("os.system", f"touch {evil}/os-system")
    method = q.enqueue("upper", args=(), kwargs={})
    conn.hset(method.key, "data", b'["upper","a string instance",[],{}]')
    out = subprocess.run([PYTHON, "-m", "rq.cli", "worker", "--burst", "-w", "rq.worker.SimpleWorker",
                          "--serializer", SERIALIZER_PATH, "--url", redis_server.url, "default"],
                         capture_output=True, text=True, timeout=120, env=subprocess_env(redis_server.url), cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(evil.iterdir()) == []
    assert Job.fetch(job.id, connection=conn, serializer=JSONSerializer).get_status() == JobStatus.FAILED
    assert "refused without being imported" in _exc_string(conn, job.id)
    assert "carries an instance" in _exc_string(conn, method.id)


def test_serializer_refuses_foreign_payloads_and_loads_everything_else():
    with pytest.raises(ForeignJobError, match="'os.system'"):
        JSONSerializer.loads(b'["os.system",null,["touch /tmp/x"],{}]')
    with pytest.raises(ForeignJobError, match="instance"):
        JSONSerializer.loads(b'["worker.tasks.classify",{"a":1},[],{}]')
    with pytest.raises(ForeignJobError):
        JSONSerializer.loads(b'[null,null,[],{}]')
    ours = [keys.JOB_FUNC, None, [], {"items": [{"id": "1", "text": "t"}], "run": "r"}]
    assert JSONSerializer.loads(JSONSerializer.dumps(ours)) == ours
    results = [{"id": str(i), "label": "POSITIVE", "score": 0.5} for i in range(4)]  # a 4-item job's result
    assert JSONSerializer.loads(JSONSerializer.dumps(results)) == results
    for other in ({}, {"meta": [1, 2, 3, 4]}, [], ["a", "b"], None, 3, "text"):
        assert JSONSerializer.loads(JSONSerializer.dumps(other)) == other


def test_job_class_checks_callback_names_before_importing(conn, evil):
    q = Queue("default", connection=conn, serializer=JSONSerializer)
    for kind in ("success", "failure", "stopped"):
        job = q.enqueue(keys.JOB_FUNC, kwargs={"items": [{"id": "a", "text": "x"}]},
                        **{f"on_{kind}": Callback("qb_evil.hook")})
        fetched = QueuebertJob.fetch(job.id, connection=conn, serializer=JSONSerializer)
        with pytest.raises(ForeignJobError, match=f"{kind} callback 'qb_evil.hook'"):
            getattr(fetched, f"{kind}_callback")
        with pytest.raises(ForeignJobError):
            fetched.perform()
    assert "qb_evil" not in sys.modules and list(evil.iterdir()) == []

    ours = q.enqueue(keys.JOB_FUNC, kwargs={"items": [{"id": "a", "text": "x"}]}, on_failure=Callback(keys.ON_FAILURE))
    fetched = QueuebertJob.fetch(ours.id, connection=conn, serializer=JSONSerializer)
    from worker.tasks import on_job_failed

    assert fetched.failure_callback is on_job_failed
    assert fetched.success_callback is None and fetched.stopped_callback is None


def test_batch_worker_refuses_a_foreign_function_with_the_reason(conn, evil, engines):
    from helpers import run_burst

    job = _attacker_queue(conn).enqueue("os.system", f"touch {evil}/os-system")
    run_burst(conn, engines["bert"])
    assert list(evil.iterdir()) == []
    assert Job.fetch(job.id, connection=conn, serializer=JSONSerializer).get_status() == JobStatus.FAILED
    assert "names function 'os.system'" in _exc_string(conn, job.id)


def test_batch_worker_recovery_refuses_a_foreign_failure_callback(conn, evil):
    from queuebert.settings import WorkerSettings
    from worker.batch_worker import BatchWorker

    job = _plant_abandoned(conn, "qb_evil.hook")
    worker = BatchWorker(["default"], connection=conn, settings=WorkerSettings(queues=["default"], burst=True))
    worker.recover_abandoned()
    assert Job.fetch(job.id, connection=conn, serializer=JSONSerializer).get_status() == JobStatus.FAILED
    assert list(evil.iterdir()) == []
