"""Stopping is part of the contract: a worker, the supervisor and the gateway stop within bounds an
orchestrator can rely on (Kubernetes SIGKILLs 30 s after SIGTERM by default), whatever Redis does,
and nothing a stopped worker held is lost.

The bounds are generous, so only a hang fails them: an idle process stops within 5 s of SIGTERM, a
busy worker within its batch in progress plus 5 s, and anything within 25 s with Redis gone (killed,
or frozen with SIGSTOP). Under redis-py 8.2 an idle worker took 53-59 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from rq import Queue
from rq.registry import StartedJobRegistry

from producer import Client
from producer.embedded_redis import RedisServer
from queuebert.procs import LoggedProcess, start_process

from conftest import PYTHON, REPO, subprocess_env
from helpers import LOG_DIR, reap, start_gateway, start_worker

IDLE_BOUND_S = 5.0
BUSY_MARGIN_S = 5.0
REDIS_GONE_BOUND_S = 25.0

_started: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    yield
    reap(_started)


def _worker(url: str, model: Path, name: str, forward_s: float = 0.0, **env: str) -> LoggedProcess:
    proc = start_worker(url, model, name, forward_s=forward_s, QUEUEBERT_MAX_BATCH_SIZE="8",
                        QUEUEBERT_MAX_POOL_ITEMS="64", **env)
    _started.append(proc)
    return proc


def _log(proc: LoggedProcess) -> str:
    return proc.log_path.read_text(errors="replace") if proc.log_path else ""


def _wait_for(check: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _registered(conn: redis.Redis, name: str) -> bool:
    return bool(conn.sismember("rq:workers", f"rq:worker:{name}"))


def _stop(proc: subprocess.Popen[bytes], limit: float) -> float:
    """SIGTERM ``proc`` and return the seconds until it exited (failing past ``limit`` + 30)."""
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=limit + 30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {limit + 30:.0f} s after SIGTERM (bound {limit:.0f} s)")
    return time.monotonic() - began


def _texts(n: int) -> list[str]:
    return [f"text {i}: " + "the food was good but the service was slow " * (1 + i % 4) for i in range(n)]


def _exactly_once(client: Client, run_id: str, n: int, timeout: float = 120) -> None:
    ids = Counter(r["id"] for r in client.ordered_results(run_id, timeout=timeout))
    assert [i for i in map(str, range(n)) if ids[i] != 1] == [], "items lost or duplicated"


# -- the worker ---------------------------------------------------------------------------------


def test_idle_worker_stops_within_5s(conn, redis_server, tiny_models):
    worker = _worker(redis_server.url, tiny_models["bert"], "stop-idle")
    _wait_for(lambda: _registered(conn, "stop-idle"), "the worker to register")
    time.sleep(1.5)  # past its first blocking take and command-channel read
    took = _stop(worker, IDLE_BOUND_S)
    assert worker.returncode == 0, _log(worker)[-2000:]
    assert took < IDLE_BOUND_S, f"an idle worker took {took:.1f} s to stop"
    assert not _registered(conn, "stop-idle"), "a stopped worker deregisters"
    assert '"level": "warning"' not in _log(worker)


def test_busy_worker_stops_within_its_batch_plus_5s(conn, redis_server, tiny_models):
    forward_s = 1.0
    run = Client.from_url(redis_server.url).enqueue_stream(_texts(400), chunk_size=4)
    worker = _worker(redis_server.url, tiny_models["bert"], "stop-busy", forward_s=forward_s)
    _wait_for(lambda: int(conn.hget(f"qb:run:{{{run.id}}}", "done_jobs") or 0) > 0, "a first completion")
    took = _stop(worker, forward_s + BUSY_MARGIN_S)
    stderr = _log(worker)
    assert worker.returncode == 0, stderr[-2000:]
    assert took < forward_s + BUSY_MARGIN_S, f"a busy worker took {took:.1f} s to stop ({forward_s} s batches)"
    # Everything it held is completed or given back: nothing is left taken.
    q = Queue("default", connection=conn)
    assert StartedJobRegistry("default", connection=conn).get_job_ids() == []
    assert conn.llen(q.intermediate_queue_key) == 0
    done_jobs = int(conn.hget(f"qb:run:{{{run.id}}}", "done_jobs") or 0)
    assert done_jobs + q.count == run.jobs, "every job is either finished or back in the queue"
    assert "gave back jobs not started" in stderr


@pytest.mark.parametrize("outage", ["frozen", "killed"])
def test_worker_stops_with_redis_gone_and_loses_nothing(outage, tiny_models):
    """SIGTERM while Redis is frozen (SIGSTOP) or killed: the worker cannot complete or give back what
    it holds, stops within 25 s anyway, and once Redis is back another worker recovers all of it."""
    n = 200
    # Killed: Redis restarts from its append-only file (fsync always: nothing acknowledged is lost).
    server = RedisServer(persistence=outage == "killed", extra_args=["--appendfsync", "always"]).start()
    try:
        client = Client.from_url(server.url)
        name = f"stop-{outage}"
        worker = _worker(server.url, tiny_models["bert"], name, forward_s=0.3)
        run = client.enqueue_stream(_texts(n), chunk_size=4, run_id=f"gone-{outage}")
        _wait_for(lambda: client.run_progress(run.id)["done"] > 0, "a first completion")
        assert server.process is not None
        if outage == "frozen":
            os.kill(server.process.pid, signal.SIGSTOP)
        else:
            server.stop(signal.SIGKILL)
        try:
            time.sleep(1)
            took = _stop(worker, REDIS_GONE_BOUND_S)
        finally:
            if outage == "frozen":
                os.kill(server.process.pid, signal.SIGCONT)
            else:
                server.start()
        assert took < REDIS_GONE_BOUND_S, f"with Redis {outage}, the worker took {took:.1f} s to stop"
        assert worker.returncode == 0, _log(worker)[-2000:]
        # What it held is in the started registry (or back in the queue): the next worker finishes it.
        _worker(server.url, tiny_models["bert"], f"after-{outage}")
        _exactly_once(client, run.id, n)
    finally:
        server.close()


# -- the supervisor and the gateway --------------------------------------------------------------


def _supervisor(url: str, model: Path, name: str) -> LoggedProcess:
    env = {"QUEUEBERT_MODEL": str(model), "QUEUEBERT_DTYPE": "float32", "QUEUEBERT_HEARTBEAT_INTERVAL": "1",
           "OMP_NUM_THREADS": "1"}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    proc = start_process([PYTHON, "-m", "queuebert_cli", "worker", "--devices", "cpu,cpu", "--name", name,
                          "--log-format", "json"], env=subprocess_env(url, **env), cwd=REPO,
                         log_path=LOG_DIR / f"{name}-{time.time():.0f}.log")
    _started.append(proc)
    return proc


def test_supervisor_stops_within_the_same_bounds(tiny_models):
    with RedisServer() as server:
        conn = redis.Redis.from_url(server.url)
        sup = _supervisor(server.url, tiny_models["bert"], "sup-idle")
        _wait_for(lambda: _registered(conn, "sup-idle-0") and _registered(conn, "sup-idle-1"), "both workers")
        time.sleep(1.5)
        took = _stop(sup, IDLE_BOUND_S)
        assert took < IDLE_BOUND_S, f"an idle supervisor took {took:.1f} s to stop:\n{_log(sup)[-2000:]}"
        assert "killing" not in _log(sup)
        assert not conn.smembers("rq:workers"), "both workers deregistered"

        sup = _supervisor(server.url, tiny_models["bert"], "sup-frozen")
        _wait_for(lambda: _registered(conn, "sup-frozen-0") and _registered(conn, "sup-frozen-1"), "both workers")
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            time.sleep(1)
            took = _stop(sup, REDIS_GONE_BOUND_S)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert took < REDIS_GONE_BOUND_S, f"with Redis frozen, the supervisor took {took:.1f} s to stop"
        assert "killing" not in _log(sup), "its workers stopped by themselves"


def test_gateway_stops_within_the_same_bounds():
    with RedisServer() as server:
        # Idle but for a subscriber: an event stream of a run that never ends (no worker).
        proc, base = start_gateway(server.url, "default")
        _started.append(proc)
        httpx.post(base + "/runs?run_id=open", content=b'{"text": "never computed"}\n', timeout=10).raise_for_status()
        events: list[str] = []

        def subscribe() -> None:
            try:
                with httpx.stream("GET", base + "/runs/open/events", timeout=60) as response:
                    events.extend(response.iter_lines())
            except httpx.HTTPError as exc:
                events.append(repr(exc))

        reader = threading.Thread(target=subscribe, daemon=True)
        reader.start()
        time.sleep(1)
        took = _stop(proc, IDLE_BOUND_S)
        assert took < IDLE_BOUND_S, f"a gateway with an open event stream took {took:.1f} s to stop"
        reader.join(5)
        assert not reader.is_alive(), "the event stream ends with the gateway"

        # A request in flight, Redis frozen: the request ends with a clear status, the gateway stops.
        proc, base = start_gateway(server.url, "default", request_timeout="120")
        _started.append(proc)
        answers: list[httpx.Response | Exception] = []

        def predict() -> None:
            try:
                answers.append(httpx.post(base + "/predict", json={"inputs": "hello"}, timeout=60))
            except httpx.HTTPError as exc:
                answers.append(exc)

        asking = threading.Thread(target=predict, daemon=True)
        asking.start()
        time.sleep(1)
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            took = _stop(proc, REDIS_GONE_BOUND_S)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert took < REDIS_GONE_BOUND_S, f"with Redis frozen, the gateway took {took:.1f} s to stop"
        asking.join(5)
        assert answers and isinstance(answers[0], httpx.Response), answers
        assert answers[0].status_code == 503 and answers[0].headers.get("retry-after"), answers[0].text
