"""Nothing lost: graceful and forced stops, workers SIGKILLed mid-run, Redis killed and restarted.

The chaos and restart tests run shortened in CI; the full versions take sizes from the
environment (see the README): QB_CHAOS_TEXTS=5000 QB_CHAOS_KILLS=8 pytest tests/test_resilience.py
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.registry import StartedJobRegistry

from producer import Client
from producer.embedded_redis import RedisServer
from queuebert.procs import LoggedProcess

from conftest import build_tiny_model
from helpers import reap, start_worker

# Seconds: executions expire after 3 heartbeats, so recovery is quick in tests. QB_HEARTBEAT=10
# measures recovery with the worker's default.
HEARTBEAT = os.environ.get("QB_HEARTBEAT", "1")


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory) -> Path:
    """Slower than the tiny models, so a run lasts long enough to be interrupted."""
    return build_tiny_model("bert", tmp_path_factory.mktemp("medium") / "bert", hidden=384, layers=6)


def _texts(n: int) -> list[str]:
    return [f"text {i}: " + "the food was good but the service was slow " * (1 + i % 6) for i in range(n)]


def _start_worker(url: str, model: Path, name: str, **env: str) -> LoggedProcess:
    """A worker process with small batches and pools (``env`` overrides), reaped after the test."""
    settings = {"QUEUEBERT_MAX_BATCH_SIZE": "8", "QUEUEBERT_MAX_POOL_ITEMS": "64",
                "QUEUEBERT_HEARTBEAT_INTERVAL": HEARTBEAT, **env}
    proc = start_worker(url, model, name, **settings)
    _started.append(proc)
    return proc


_started: list[LoggedProcess] = []


@pytest.fixture(autouse=True)
def _reap_workers():
    yield
    reap(_started)


def _log(proc: LoggedProcess) -> str:
    assert proc.log_path is not None
    return proc.log_path.read_text(errors="replace")


def _wait_registered(conn: redis.Redis, name: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if conn.exists(f"rq:worker:{name}"):
            return
        time.sleep(0.1)
    raise AssertionError(f"worker {name} did not register")


def _assert_exactly_once(client: Client, run_id: str, n: int, timeout: float = 120) -> list[dict]:
    results = list(client.ordered_results(run_id, timeout=timeout))
    ids = Counter(r["id"] for r in results)
    lost = [str(i) for i in range(n) if ids[str(i)] == 0]
    duplicated = [k for k, v in ids.items() if v > 1]
    assert not lost, f"{len(lost)} items lost"
    assert not duplicated, f"{len(duplicated)} items duplicated"
    assert [r["id"] for r in results] == [str(i) for i in range(n)]
    assert not [r for r in results if "error" in r][:1]
    return results


def test_graceful_stop_finishes_batch_and_gives_back_the_rest(conn, redis_server, tiny_models):
    client = Client.from_url(redis_server.url)
    run = client.enqueue_stream(_texts(3000), chunk_size=5)
    worker = _start_worker(redis_server.url, tiny_models["bert"], "graceful")
    _wait_registered(conn, "graceful")
    while run.progress()["done"] == 0:
        time.sleep(0.05)
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=60)
    stderr = _log(worker)
    assert worker.returncode == 0, stderr[-2000:]
    q = Queue("default", connection=conn)
    assert StartedJobRegistry("default", connection=conn).get_job_ids() == []  # nothing left half-taken
    done_jobs = int(conn.hget(f"qb:run:{{{run.id}}}", "done_jobs") or 0)
    assert done_jobs + q.count == run.jobs, "every job is either finished or back in the queue"
    assert q.count > 0, "the stop came early enough to leave work for the next worker"
    assert "gave back jobs not started" in stderr
    second = _start_worker(redis_server.url, tiny_models["bert"], "after-graceful", QUEUEBERT_BURST="1")
    second.wait(timeout=300)
    assert second.returncode == 0, _log(second)[-2000:]
    _assert_exactly_once(client, run.id, 3000)


def test_second_signal_forces_exit(conn, redis_server, medium_model):
    client = Client.from_url(redis_server.url)
    run = client.enqueue_stream(_texts(3000), chunk_size=50)
    # Big batches of a slower model: the batch in progress lasts seconds, so the first SIGTERM
    # (a warm stop) is still waiting on it when the second arrives.
    worker = _start_worker(redis_server.url, medium_model, "forced", QUEUEBERT_MAX_BATCH_SIZE="1000",
                           QUEUEBERT_MAX_BATCH_TOKENS="200000", QUEUEBERT_MAX_WAIT_MS="300")
    _wait_registered(conn, "forced")
    while conn.llen("rq:queue:default") == run.jobs:
        time.sleep(0.05)  # until it has taken work
    time.sleep(0.5)
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert worker.poll() is None, "the warm stop should still be finishing its batch"
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=30)
    assert worker.returncode == 1


def test_chaos_sigkill_workers_nothing_lost(conn, redis_server, medium_model):
    # Enough work that the run outlasts every kill on a fast CPU (1,500 ran out before the third
    # kill on an AMX machine); a slower machine only takes longer.
    n = int(os.environ.get("QB_CHAOS_TEXTS", "3000"))
    kills = int(os.environ.get("QB_CHAOS_KILLS", "3"))
    client = Client.from_url(redis_server.url, retries=10)
    run = client.enqueue_stream(_texts(n), chunk_size=4)
    workers = {name: _start_worker(redis_server.url, medium_model, name) for name in ("chaos-a", "chaos-b")}
    for name in workers:
        _wait_registered(conn, name)
    recoveries: list[float] = []
    started = StartedJobRegistry("default", connection=conn)
    for k in range(kills):
        time.sleep(1.0)
        assert not run.is_done(), "the run ended before every kill happened: raise QB_CHAOS_TEXTS"
        victim = f"chaos-{'ab'[k % 2]}"
        held = [j for j in started.get_job_ids(cleanup=False)]
        workers[victim].send_signal(signal.SIGKILL)
        workers[victim].wait()
        killed_at = time.time()
        # Recovery: every job the dead worker held leaves the started registry (requeued).
        while any(conn.hget(f"rq:job:{j}", "worker_name") == victim.encode() and j in
                  started.get_job_ids(cleanup=False) for j in held):
            time.sleep(0.1)
            assert time.time() - killed_at < 60, "abandoned jobs not recovered within 60 s"
        recoveries.append(time.time() - killed_at)
        conn.delete(f"rq:worker:{victim}")  # its registration expires later; the name is reused now
        workers[victim] = _start_worker(redis_server.url, medium_model, victim)
    try:
        _assert_exactly_once(client, run.id, n, timeout=300)
    finally:
        for proc in workers.values():
            proc.send_signal(signal.SIGTERM)
        for proc in workers.values():
            proc.wait(timeout=60)
    print(f"chaos: {n} texts, {len(recoveries)} kills, 0 lost, recovery seconds {[round(r, 1) for r in recoveries]}")


def _registered_pids(conn: redis.Redis, prefix: str) -> dict[str, int]:
    """Live workers whose name starts with ``prefix``: name -> pid (RQ keeps the pid in the hash)."""
    out = {}
    for key in conn.smembers("rq:workers"):
        name = key.decode().removeprefix("rq:worker:")
        pid = conn.hget(key, "pid")
        if name.startswith(prefix) and pid and not conn.hexists(key, "death"):
            out[name] = int(pid)
    return out


def test_chaos_sigkill_replicas_of_one_device_nothing_lost(conn, redis_server, medium_model):
    """`--workers-per-device 2`: the supervisor's processes share one device; each is SIGKILLed in
    turn mid-run, the supervisor starts it again, and every item still comes back exactly once."""
    kills = int(os.environ.get("QB_CHAOS_KILLS", "3"))
    # Each kill waits for the replacement to load its model while the other process works on:
    # ~6 s a kill here, so the run must outlast them (5,000 texts ended before the 8th).
    n = max(int(os.environ.get("QB_CHAOS_TEXTS", "3000")), 2000 * kills)
    client = Client.from_url(redis_server.url, retries=10)
    run = client.enqueue_stream(_texts(n), chunk_size=4)
    supervisor = _start_worker(redis_server.url, medium_model, "replicas", QUEUEBERT_WORKERS_PER_DEVICE="2")
    deadline = time.time() + 60
    while len(_registered_pids(conn, "replicas-")) < 2:
        assert time.time() < deadline and supervisor.poll() is None, _log(supervisor)[-2000:]
        time.sleep(0.1)
    started = StartedJobRegistry("default", connection=conn)
    killed: set[str] = set()
    replaced: list[float] = []
    recovered: list[float] = []
    for k in range(kills):
        time.sleep(1.0)
        assert not run.is_done(), "the run ended before every kill happened: raise QB_CHAOS_TEXTS"
        live = _registered_pids(conn, "replicas-")
        victim = sorted(name for name in live if name not in killed)[k % 2]
        held = started.get_job_ids(cleanup=False)
        os.kill(live[victim], signal.SIGKILL)
        killed.add(victim)
        killed_at = time.time()
        # The supervisor starts a new process under a new name (the dead one's is still registered).
        while len(set(_registered_pids(conn, "replicas-")) - killed) < 2:
            assert supervisor.poll() is None, _log(supervisor)[-2000:]
            assert time.time() - killed_at < 60, "the supervisor did not replace the killed worker within 60 s"
            time.sleep(0.1)
        replaced.append(time.time() - killed_at)
        while any(conn.hget(f"rq:job:{j}", "worker_name") == victim.encode() and j in
                  started.get_job_ids(cleanup=False) for j in held):
            assert time.time() - killed_at < 60, "abandoned jobs not recovered within 60 s"
            time.sleep(0.1)
        recovered.append(time.time() - killed_at)
    _assert_exactly_once(client, run.id, n, timeout=300)
    supervisor.send_signal(signal.SIGTERM)
    supervisor.wait(timeout=60)
    assert supervisor.returncode == 0, _log(supervisor)[-2000:]
    # The killed ones' registrations outlive them (until RQ's cleanup); the stopped ones deregistered.
    assert set(_registered_pids(conn, "replicas-")) <= killed, "a stopped worker is still registered"
    assert _log(supervisor).count('"worker process died, restarting"') == kills
    print(f"chaos, replicas: {n} texts, {kills} kills, 0 lost; replaced after {[round(r, 1) for r in replaced]} s, "
          f"jobs recovered after {[round(r, 1) for r in recovered]} s")


def test_redis_killed_and_restarted_mid_run(tmp_path, medium_model):
    n = int(os.environ.get("QB_RESTART_TEXTS", "1500"))
    # appendfsync always: a kill -9 loses no acknowledged write (see README, "Persistence").
    server = RedisServer(persistence=True, extra_args=["--appendfsync", "always"]).start()
    try:
        client = Client.from_url(server.url)
        conn = client.connection
        worker = _start_worker(server.url, medium_model, "restart")
        _wait_registered(conn, "restart")
        holder: dict = {}
        producer = threading.Thread(target=lambda: holder.update(run=client.enqueue_stream(
            _texts(n), chunk_size=4, run_id="restart-run", max_pending=400)))
        producer.start()
        time.sleep(1.5)
        assert client.run_progress("restart-run")["done"] < n, "the run ended before Redis was killed"
        server.stop(signal.SIGKILL)
        time.sleep(2)
        server.start()
        producer.join(timeout=120)
        assert "run" in holder, "the producer gave up during the outage"
        _assert_exactly_once(client, "restart-run", n, timeout=180)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        assert worker.returncode == 0, _log(worker)[-2000:]
    finally:
        server.close()
