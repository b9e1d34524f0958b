"""Operating it: Prometheus metrics, `queuebert stats --json`, deadlines, the device supervisor."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

from rq.job import Job

from producer import Client
from queuebert.serializer import JSONSerializer
from queuebert.settings import WorkerSettings

from conftest import PYTHON, REPO, subprocess_env
from helpers import run_burst, start_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _metric(values: dict[str, float], prefix: str, **labels: str) -> float:
    for name, value in values.items():
        if name.startswith(prefix + "{") and all(f'{k}="{v}"' in name for k, v in labels.items()):
            return value
    raise KeyError(f"{prefix} {labels} not in {sorted(values)[:40]}")


def _wait_for(predicate, timeout: float = 60, step: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def test_metrics_endpoint_families_and_counts_move(conn, redis_server, tiny_models, tmp_path):
    port = _free_port()
    env = subprocess_env(redis_server.url, QUEUEBERT_MODEL=str(tiny_models["bert"]), QUEUEBERT_DTYPE="float32")
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([PYTHON, "-m", "queuebert_cli", "worker", "--metrics-port", str(port),
                               "--name", "metrics"], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    try:
        def ready():
            try:
                return _scrape(port)
            except OSError:
                return None
        before = _wait_for(ready)
        for family in ("queuebert_items_total", "queuebert_jobs_total", "queuebert_batch_texts_bucket",
                       "queuebert_batch_padded_tokens_bucket", "queuebert_queue_wait_seconds_bucket",
                       "queuebert_forward_seconds_bucket", "queuebert_model_load_seconds"):
            assert any(name.startswith(family) for name in before), family
        assert _metric(before, "queuebert_items_total", outcome="ok", device="cpu") == 0
        assert _metric(before, "queuebert_model_load_seconds") > 0
        client = Client.from_url(redis_server.url)
        run = client.enqueue_stream(["good", "bad", "fine"] * 10, chunk_size=3)
        client.queue().enqueue("worker.tasks.classify", kwargs={"items": []})  # fails as a job
        assert run.wait(timeout=60)

        def failed_once() -> dict[str, float] | None:  # the scrape once a job has failed
            v = _scrape(port)
            return v if _metric(v, "queuebert_jobs_total", outcome="failed") >= 1 else None

        after = _wait_for(failed_once)
        assert _metric(after, "queuebert_items_total", outcome="ok") == 30
        assert _metric(after, "queuebert_jobs_total", outcome="finished") == 10
        assert _metric(after, "queuebert_batch_texts_count") >= 1
        assert _metric(after, "queuebert_forward_seconds_count") >= 1
        assert f'model="{tiny_models["bert"]}"' in next(n for n in after if n.startswith("queuebert_items_total"))
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)


def test_stats_json_reports_queues_workers_runs(conn, redis_server, engines):
    client = Client.from_url(redis_server.url)
    done_run = client.enqueue_stream(["a", "b", "c"], chunk_size=1)
    run_burst(conn, engines["bert"])
    pending = client.enqueue_stream(["d", "e"], chunk_size=1)
    client.queue("high").enqueue("worker.tasks.classify", kwargs={"items": []})
    out = subprocess.run([PYTHON, "-m", "queuebert_cli", "stats", "--json", "--redis-url", redis_server.url],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    queues = {q["name"]: q for q in stats["queues"]}
    assert queues["default"]["waiting"] == 2 and queues["default"]["finished"] == 3
    assert queues["high"]["waiting"] == 1
    runs = {r["run"]: r for r in stats["runs"]}
    assert pending.id in runs and done_run.id not in runs
    assert runs[pending.id]["done"] == 0 and runs[pending.id]["total"] == 2
    human = subprocess.run([PYTHON, "-m", "queuebert_cli", "stats", "--redis-url", redis_server.url, "--all-runs"],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert human.returncode == 0 and done_run.id in human.stdout and "waiting" in human.stdout


def test_stats_lists_a_running_worker_with_device_and_items(conn, redis_server, tiny_models):
    """A live `queuebert worker` process is listed with what it serves and has done; once it has
    stopped it is not listed."""
    from producer.stats import worker_stats

    client = Client.from_url(redis_server.url)
    run = client.enqueue_stream(["x"] * 5, chunk_size=1)
    proc = start_worker(redis_server.url, tiny_models["bert"], "stats-w")
    try:
        assert run.wait(timeout=120)
        # The worker registered before it took the jobs; its counters may trail the run by a moment.
        deadline = time.time() + 30
        while (rows := worker_stats(conn)) and rows[0]["jobs_done"] < 5 and time.time() < deadline:
            time.sleep(0.1)
        assert [(r["name"], r["jobs_done"]) for r in rows] == [("stats-w", 5)]
        assert proc.poll() is None, "the worker must still be running while it is listed"
        row = rows[0]
        assert row["pid"] == proc.pid
        assert row["queues"] == ["default"] and row["state"] in {"idle", "busy"}
        assert (row["device"], row["dtype"], row["items_done"]) == ("cpu", "float32", 5)
        assert row["model"] == str(tiny_models["bert"])
        assert row["last_heartbeat"] is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert worker_stats(conn) == []  # a stopped worker has registered its death


def test_deadline_drops_late_jobs_and_tells_subscribers(conn, redis_server, engines):
    late = Client.from_url(redis_server.url, job_ttl=0.2)
    run = late.enqueue_stream(["too late 1", "too late 2"], chunk_size=1)
    on_time = Client.from_url(redis_server.url, job_ttl=600).submit("in time")
    time.sleep(0.5)
    run_burst(conn, engines["bert"])
    results = list(late.subscribe(run.id, timeout=10))
    assert [r["error"]["type"] for r in results] == ["deadline_exceeded"] * 2
    assert "deadline exceeded" in results[0]["error"]["message"]
    assert on_time.result(timeout=5)["label"]
    q = late.queue()
    failed = q.failed_job_registry.get_job_ids()
    assert len(failed) == 2
    job = Job.fetch(failed[0], connection=conn, serializer=JSONSerializer)
    assert "deadline exceeded" in job.latest_result().exc_string
    assert engines["bert"].forward_calls >= 1


def test_burst_ends_as_soon_as_the_taker_finds_nothing(conn, redis_server, engines, monkeypatch):
    """A burst worker returns once its last jobs are written and the taker finds nothing more,
    not at compute's next look at an empty pool (half a second later)."""
    from worker.taker import Taker

    taker_ended: list[float] = []
    run_taker = Taker.run

    def run(self: Taker, burst: bool) -> None:
        run_taker(self, burst)
        taker_ended.append(time.monotonic())

    monkeypatch.setattr(Taker, "run", run)
    handles = Client.from_url(redis_server.url).submit_many(["one", "two", "three"], chunk_size=1)
    run_burst(conn, engines["bert"])
    returned = time.monotonic()
    assert [h.result(timeout=5)["label"] for h in handles]
    assert len(taker_ended) == 1
    assert returned - taker_ended[0] < 0.25  # compute polls an empty pool every 0.5 s


def test_supervisor_runs_one_worker_per_device_and_restarts_the_dead(conn, redis_server, tiny_models, tmp_path):
    env = subprocess_env(redis_server.url, QUEUEBERT_MODEL=str(tiny_models["bert"]), QUEUEBERT_DTYPE="float32",
                         OMP_NUM_THREADS="1")
    log = open(tmp_path / "supervisor.log", "wb")
    sup = subprocess.Popen([PYTHON, "-m", "queuebert_cli", "worker", "--devices", "cpu,cpu", "--name", "sup",
                            "--log-format", "json"], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    try:
        names = ("rq:worker:sup-0", "rq:worker:sup-1")
        _wait_for(lambda: all(conn.exists(n) for n in names))
        os.kill(int(conn.hget(names[0], "pid")), signal.SIGKILL)
        # The dead worker's registration outlives it; its replacement registers under a name of its own.
        _wait_for(lambda: conn.exists("rq:worker:sup-0-r1"))
        handle = Client.from_url(redis_server.url).submit("served by a supervised worker")
        assert handle.result(timeout=60)["label"]
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=90)
    assert sup.returncode == 0
    assert not any(conn.exists(n) and not conn.hexists(n, "death") for n in ("rq:worker:sup-0-r1", "rq:worker:sup-1"))


def test_workers_per_device_share_the_host_threads(tmp_path):
    """Each of N processes on a host gets an equal share of its cores for the tokenizer (and, on a
    CPU device, for torch), unless the environment already says; one process gets no say."""
    from worker.supervisor import Supervisor, shared_host_env

    cores = len(os.sched_getaffinity(0))
    assert shared_host_env(1, "cuda:0", {}) == {}
    share = str(max(1, cores // 2))
    assert shared_host_env(2, "cuda:0", {}) == {"RAYON_NUM_THREADS": share}
    assert shared_host_env(2, "cpu", {}) == {"RAYON_NUM_THREADS": share, "OMP_NUM_THREADS": share}
    assert shared_host_env(2, "cpu", {"OMP_NUM_THREADS": "7"}) == {"RAYON_NUM_THREADS": share}
    assert shared_host_env(4 * cores, "cpu", {})["OMP_NUM_THREADS"] == "1"
    sup = Supervisor(WorkerSettings(workers_per_device=3, name="w"), ["cuda:0", "cuda:1"])
    assert [c.device for c in sup.children] == ["cuda:0"] * 3 + ["cuda:1"] * 3
    child = sup._child_settings(sup.children[4])
    assert (child.device, child.name, child.workers_per_device) == ("cuda:1", "w-4", 1)
