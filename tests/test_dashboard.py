"""rq-dashboard, started the way docker/compose.yaml starts it, shows queuebert's jobs, queues and workers.

queuebert stores jobs as JSON (queuebert.serializer); rq-dashboard unpickles job data unless its
JSON switch is on (``--json``, or ``RQ_DASHBOARD_JSON=true`` through click's ``RQ_DASHBOARD_``
environment prefix), and then every job page is a 500 (``UnpicklingError: invalid load key '['``).
The switch selects RQ's stock ``rq.serializers.JSONSerializer``, which reads queuebert's payloads:
they are plain JSON. These tests run the real dashboard (``python -m rq_dashboard``, the image's
entry point) as a process with the environment of compose's ``rq-dashboard`` service, against real
jobs that a BatchWorker finished or failed, and read its pages and the JSON its pages load.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rq import Worker
from rq.job import Job

from producer import Client
from queuebert.keys import JOB_FUNC
from queuebert.procs import LoggedProcess, free_port, start_process, stop_process
from queuebert.serializer import JSONSerializer

from conftest import PYTHON, REPO
from helpers import LOG_DIR, run_burst, start_worker

httpx = pytest.importorskip("httpx", reason="httpx (the `test` extra) is not installed")
# The dashboard's modules are imported by its own process; importing them here only tells early
# whether it can start (0.9.0 imports six without requiring it, hence the `test` extra's six).
pytest.importorskip("rq_dashboard.web", reason="rq-dashboard (the `test` extra) is not installed or cannot import")

COMPOSE = REPO / "docker" / "compose.yaml"
START_TIMEOUT_S = 30.0
#: The registries' list URL as the dashboard's own pages build it: 8 jobs a page, oldest first.
PAGE = "8/asc/1"


def compose_dashboard_env() -> dict[str, str]:
    """The ``rq-dashboard`` service's environment in docker/compose.yaml."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed; compose.yaml is not parsed")
    service = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]["rq-dashboard"]
    return {str(k): str(v) for k, v in (service.get("environment") or {}).items()}


@dataclass
class Dashboard:
    """A running dashboard: an HTTP client on its port, and its log (werkzeug's tracebacks)."""

    web: httpx.Client
    log_path: Path


@pytest.fixture()
def dashboard(redis_server: Any) -> Iterator[Callable[..., Dashboard]]:
    """``start(json=True)``: a dashboard process on a free loopback port, with compose's environment
    (its Redis URL replaced by this session's); ``json=False`` drops the JSON switch."""
    procs: list[LoggedProcess] = []
    clients: list[httpx.Client] = []

    def start(json: bool = True) -> Dashboard:
        env = compose_dashboard_env()
        if not json:
            env.pop("RQ_DASHBOARD_JSON", None)
        port = free_port()
        env.update(RQ_DASHBOARD_REDIS_URL=redis_server.url, RQ_DASHBOARD_BIND="127.0.0.1",
                   RQ_DASHBOARD_PORT=str(port))
        # Only compose's RQ_DASHBOARD_* apply, none of the caller's.
        base = {k: v for k, v in os.environ.items() if not k.startswith("RQ_DASHBOARD_")}
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log_path = LOG_DIR / f"rq-dashboard-{port}-{time.time():.0f}.log"
        proc = start_process([PYTHON, "-m", "rq_dashboard"], env={**base, **env}, cwd=REPO,
                             log_path=log_path, stdout="log")
        procs.append(proc)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        clients.append(client)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"rq-dashboard exited ({proc.returncode}): {log_path.read_text()}"
            try:
                if client.get("/").status_code == 200:
                    return Dashboard(client, log_path)
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"rq-dashboard not up in {START_TIMEOUT_S}s: {log_path.read_text()}"
            time.sleep(0.1)

    yield start
    for client in clients:
        client.close()
    for proc in procs:
        stop_process(proc, grace=5)


def get_json(client: httpx.Client, path: str) -> dict[str, Any]:
    response = client.get(path)
    assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text[:2000]}"
    return response.json()


def get_page(client: httpx.Client, path: str) -> str:
    response = client.get(path)
    assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text[:2000]}"
    return response.text


def test_dashboard_shows_finished_and_failed_jobs_queues_and_workers(conn, redis_server, engines, tiny_models,
                                                                     dashboard) -> None:
    client = Client.from_url(redis_server.url)
    queue = client.queue()
    one = client.submit({"id": "one", "text": "a fine sunny day"})
    many = client.submit_many([{"id": f"m{i}", "text": f"text number {i}"} for i in range(3)], chunk_size=3)
    failed = queue.enqueue(JOB_FUNC, kwargs={"items": []})  # fails as a whole: a job with no items
    run_burst(conn, engines["bert"])
    assert one.result(timeout=5)["label"] and many[0].result(timeout=5)["label"]
    assert failed.id in queue.failed_job_registry.get_job_ids()

    web = dashboard().web

    # A finished job: its page, and the JSON that page loads.
    assert one.job_id in get_page(web, f"/0/view/job/{one.job_id}")
    info = get_json(web, f"/0/data/job/{one.job_id}.json")
    assert info["id"] == one.job_id and info["status"] == "finished" and info["origin"] == queue.name
    assert info["description"].startswith("classify 1 text(s)")
    (result,) = info["result"]
    assert result["id"] == "one" and result["label"] == one.result()["label"]
    assert info["exc_info"] is None and info["ended_at"]
    info = get_json(web, f"/0/data/job/{many[0].job_id}.json")
    assert [r["id"] for r in info["result"]] == ["m0", "m1", "m2"]

    # A failed job: status and the worker's exception.
    assert failed.id in get_page(web, f"/0/view/job/{failed.id}")
    info = get_json(web, f"/0/data/job/{failed.id}.json")
    assert info["id"] == failed.id and info["status"] == "failed"
    assert "no items" in info["exc_info"] and info["result"] is None

    # Queues: the overview and its counts, each registry's page and job list.
    assert "Queues" in get_page(web, "/")
    (default,) = [q for q in get_json(web, "/0/data/queues.json")["queues"] if q["name"] == queue.name]
    assert default["count"] == 0 and default["failed_job_registry_count"] == 1
    assert default["finished_job_registry_count"] == 2
    for registry, ids in (("finished", {one.job_id, many[0].job_id}), ("failed", {failed.id})):
        get_page(web, f"/0/view/jobs/{queue.name}/{registry}/{PAGE}")
        listed = get_json(web, f"/0/data/jobs/{queue.name}/{registry}/{PAGE}.json")
        assert {j["id"] for j in listed["jobs"]} == ids, listed
        assert all("classify" in j["description"] for j in listed["jobs"]), listed
    (failed_row,) = get_json(web, f"/0/data/jobs/{queue.name}/failed/{PAGE}.json")["jobs"]
    assert "no items" in failed_row["exc_info"]

    # A queued job in the queue's own list, then a live `queuebert worker` that runs it.
    waiting = client.submit({"id": "w", "text": "waiting for a worker"})
    listed = get_json(web, f"/0/data/jobs/{queue.name}/queued/{PAGE}.json")
    assert [j["id"] for j in listed["jobs"]] == [waiting.job_id]
    worker = start_worker(redis_server.url, tiny_models["bert"], "qb-dash-worker")
    try:
        assert waiting.result(timeout=120)["label"], worker.log_path
        (name,) = [w.name for w in Worker.all(connection=conn)]
        assert name.startswith("qb-dash-worker")
        assert "workers.json" in get_page(web, "/0/view/workers")  # the page lists them from that JSON
        (row,) = get_json(web, "/0/data/workers.json")["workers"]
        assert row["name"] == name and row["queues"] == [queue.name] and row["pid"] == worker.pid
        assert row["successful_job_count"] >= 1 and row["current_job"] == "idle"
    finally:
        stop_process(worker, grace=30)

    # Its requeue button (RQ's requeue_job) leaves a job that queuebert's serializer still loads.
    assert web.post(f"/job/{failed.id}/requeue").json() == {"status": "OK"}
    assert queue.get_job_ids() == [failed.id]
    again = Job.fetch(failed.id, connection=conn, serializer=JSONSerializer)
    assert again.get_status() == "queued" and again.func_name == JOB_FUNC and again.kwargs == {"items": []}


def test_without_the_json_switch_job_pages_fail(conn, redis_server, engines, dashboard) -> None:
    """The switch is what makes the pages above work: without it the dashboard unpickles JSON."""
    client = Client.from_url(redis_server.url)
    handle = client.submit("a fine sunny day")
    run_burst(conn, engines["bert"])
    assert handle.result(timeout=5)["label"]
    pickled = dashboard(json=False)
    assert pickled.web.get(f"/0/data/job/{handle.job_id}.json").status_code == 500
    assert "UnpicklingError: invalid load key, '['" in pickled.log_path.read_text()
