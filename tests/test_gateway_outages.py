"""``queuebert serve`` when something around it is slow, frozen, restarted or killed (issue 23,
findings 2-5): real redis-server processes, real worker and gateway processes, no mocks.

Bounds are generous, so only a hang (or the old behaviour) fails them."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis
from rq import Queue

from producer.embedded_redis import RedisServer
from queuebert.procs import LoggedProcess
from queuebert.serializer import JSONSerializer

from helpers import reap, start_gateway, start_worker

_started: list[LoggedProcess] = []


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    # Killed, not stopped: nothing here tests a stop, and a worker whose Redis a test closed
    # already would wait out its stop_timeout.
    yield
    reap(_started)


def _keep(proc: LoggedProcess) -> LoggedProcess:
    _started.append(proc)
    return proc


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> float:
    """Seconds until ``check()`` held; fails past ``timeout``."""
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - began


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


# -- finding 2: a run's jobs have no deadline unless its caller asks for one -----------------------

def test_runs_have_no_deadline_unless_asked(redis_server, conn, tiny_models):
    """A gateway whose request timeout is 1 s; no worker until 3 s after the runs were posted.
    The run posted plainly is computed in full (its jobs carry no deadline); the one posted with
    ``?job_ttl=1`` is dropped as asked; a job_ttl that is not a positive number is 422."""
    gateway, base = start_gateway(redis_server.url, "runs-late", request_timeout="1")
    _keep(gateway)
    lines = "".join(json.dumps({"id": f"t{i}", "text": f"a slow but healthy worker {i}"}) + "\n" for i in range(150))
    plain = httpx.post(f"{base}/runs", content=lines, timeout=30)
    assert plain.status_code == 201, plain.text
    asked = httpx.post(f"{base}/runs", params={"job_ttl": "1"}, content=lines, timeout=30)
    assert asked.status_code == 201, asked.text

    queued = Queue("runs-late", connection=conn, serializer=JSONSerializer).get_jobs()
    by_run: dict[str, list[dict]] = {}
    for job in queued:
        by_run.setdefault(job.kwargs["run"], []).append(job.kwargs)
    assert set(by_run) == {plain.json()["run_id"], asked.json()["run_id"]}
    assert all("deadline" not in kw for kw in by_run[plain.json()["run_id"]])
    assert all("deadline" in kw for kw in by_run[asked.json()["run_id"]])

    time.sleep(3)  # past both the request timeout and the asked-for job_ttl
    _keep(start_worker(redis_server.url, tiny_models["bert"], "runs-late-w", QUEUEBERT_QUEUES="runs-late"))
    with httpx.Client(timeout=120) as client:
        got = [json.loads(line) for line in client.get(f"{base}/runs/{plain.json()['run_id']}/results").iter_lines()
               if line]
        dropped = [json.loads(line) for line in
                   client.get(f"{base}/runs/{asked.json()['run_id']}/results").iter_lines() if line]
    assert [r["id"] for r in got] == [f"t{i}" for i in range(150)]
    assert not [r for r in got if "deadline_exceeded" in json.dumps(r)], got[:3]
    assert len(dropped) == 150 and all("deadline_exceeded" in json.dumps(r) for r in dropped), dropped[:3]
    for bad in ("abc", "0", "-5", "nan", "inf", "1e400"):
        refused = httpx.post(f"{base}/runs", params={"job_ttl": bad}, content=lines, timeout=30)
        assert refused.status_code == 422 and refused.json()["error_type"] == "Validation", (bad, refused.text)
    assert len(Queue("runs-late", connection=conn, serializer=JSONSerializer)) == 0  # refused: nothing enqueued


# -- finding 4: a frozen or stopped Redis never holds a request past its timeout -----------------

def _timed(method: str, url: str, **kwargs: object) -> tuple[float, httpx.Response | Exception]:
    """Seconds the call took and its response (or the transport error, e.g. the test's own
    read timeout on a gateway that hangs)."""
    began = time.monotonic()
    try:
        response: httpx.Response | Exception = httpx.request(method, url, timeout=60, **kwargs)  # type: ignore[arg-type]
    except httpx.TransportError as exc:
        response = exc
    return time.monotonic() - began, response


def _clear_error(response: httpx.Response | Exception, statuses: tuple[int, ...]) -> bool:
    return (isinstance(response, httpx.Response) and response.status_code in statuses
            and set(response.json()) == {"error", "error_type"})


REQUEST_TIMEOUT_S = 6.0
#: /health's bound: the default QUEUEBERT_REDIS_TIMEOUT (5 s) plus room for a loaded machine.
HEALTH_BOUND_S = 9.0
#: A request's: its timeout plus the same room.
REQUEST_BOUND_S = REQUEST_TIMEOUT_S + 4.0


def test_frozen_or_stopped_redis_answers_within_timeouts(tiny_models):
    """Redis frozen (SIGSTOP) and then stopped under a gateway with a 6 s request timeout:
    ``/health`` says 503 within a few seconds and ``/predict`` ends by its timeout with TEI's JSON
    503 or 504, each time; once Redis is back, the gateway is healthy again."""
    from concurrent.futures import ThreadPoolExecutor

    server = RedisServer().start()
    try:
        _keep(start_worker(server.url, tiny_models["bert"], "outage-w", QUEUEBERT_QUEUES="outage"))
        gateway, base = start_gateway(server.url, "outage", request_timeout=f"{REQUEST_TIMEOUT_S:g}")
        _keep(gateway)
        _wait_for(lambda: _healthy(base), "a healthy gateway", 120)
        assert httpx.post(f"{base}/predict", json={"inputs": "warm"}, timeout=30).status_code == 200

        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(3) as pool:
                health = pool.submit(_timed, "GET", f"{base}/health")
                predict = pool.submit(_timed, "POST", f"{base}/predict", json={"inputs": "frozen"})
                info = pool.submit(_timed, "GET", f"{base}/info")
                (h_s, h), (p_s, p), (i_s, i) = health.result(), predict.result(), info.result()
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert h_s < HEALTH_BOUND_S and isinstance(h, httpx.Response) and h.status_code == 503, (h_s, h)
        assert p_s < REQUEST_BOUND_S and _clear_error(p, (503, 504)), (p_s, p)
        # /info may answer from what it read in the last 2 s (the workers' model changes slowly).
        assert i_s < HEALTH_BOUND_S and (_clear_error(i, (503,)) or i.status_code == 200), (i_s, i)  # type: ignore[union-attr]

        print(f"Redis frozen: /health {h_s:.1f} s, /predict {p_s:.1f} s ({p.status_code}), /info {i_s:.1f} s")  # type: ignore[union-attr]
        _wait_for(lambda: _healthy(base), "the gateway healthy again after SIGCONT", 60)
        assert httpx.post(f"{base}/predict", json={"inputs": "thawed"}, timeout=30).status_code == 200

        server.stop()
        h_s, h = _timed("GET", f"{base}/health")
        p_s, p = _timed("POST", f"{base}/predict", json={"inputs": "gone"})
        assert h_s < HEALTH_BOUND_S and isinstance(h, httpx.Response) and h.status_code == 503, (h_s, h)
        assert p_s < REQUEST_BOUND_S and _clear_error(p, (503, 504)), (p_s, p)
        print(f"Redis stopped: /health {h_s:.1f} s, /predict {p_s:.1f} s ({p.status_code})")  # type: ignore[union-attr]
    finally:
        if server.process is not None:
            os.kill(server.process.pid, signal.SIGCONT)
        server.close()


# -- finding 5: workers register again when a restarted Redis has forgotten them ------------------

def test_health_recovers_after_redis_restart_without_persistence(tiny_models):
    """Redis restarted empty under a worker (1 s heartbeat) and a gateway: the worker registers
    again (RQ's worker sets and its model fields), so ``/health`` and ``/info`` answer 200 again
    within a few heartbeats, and ``/predict`` still works."""
    server = RedisServer().start()
    try:
        worker = _keep(start_worker(server.url, tiny_models["bert"], "restart-w", QUEUEBERT_QUEUES="restart"))
        gateway, base = start_gateway(server.url, "restart")
        _keep(gateway)
        _wait_for(lambda: _healthy(base), "a healthy gateway", 120)

        server.stop()
        server.start()  # same port, nothing kept
        restarted = time.monotonic()
        conn = redis.Redis.from_url(server.url)
        # Past the gateway's cache of the served model (2 s), so /health reads the workers again.
        time.sleep(3)
        _wait_for(lambda: _healthy(base), "/health 200 after the restart", 30)
        print(f"/health 200 again {time.monotonic() - restarted:.1f} s after Redis restarted empty")
        assert conn.sismember("rq:workers", "rq:worker:restart-w")
        assert conn.sismember("rq:workers:restart", "rq:worker:restart-w")
        fields = conn.hgetall("rq:worker:restart-w")
        assert fields[b"queues"] == b"restart" and fields[b"pid"] == str(worker.pid).encode()
        assert conn.ttl("rq:worker:restart-w") > 0
        info = httpx.get(f"{base}/info", timeout=10)
        assert info.status_code == 200 and info.json()["model_id"] == str(tiny_models["bert"]), info.text
        answer = httpx.post(f"{base}/predict", json={"inputs": "after the restart"}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()) == 2, answer.text
        conn.close()
    finally:
        server.close()


# -- finding 3: with default settings, a SIGKILLed worker's requests are answered in time ---------

def _holding(conn: redis.Redis, name: str) -> int:
    """Jobs worker ``name`` holds (its executions, as RQ keeps them)."""
    key = f"rq:worker:{name}:executions"
    kind = conn.type(key)
    return int(conn.zcard(key) if kind == b"zset" else conn.scard(key) if kind == b"set" else 0)


def test_worker_killed_with_default_heartbeat_answers_within_default_timeout(redis_server, conn, tiny_models):
    """Two workers with the default heartbeat interval behind a gateway with the default request
    timeout; one is SIGKILLed while it holds jobs of requests in flight. The other serves them
    within the timeout: every request gets 200, none 504."""
    from concurrent.futures import ThreadPoolExecutor

    from queuebert.settings import GatewaySettings, WorkerSettings

    default_beat = str(WorkerSettings().heartbeat_interval)
    workers = {name: _keep(start_worker(redis_server.url, tiny_models["bert"], name, forward_s=0.3,
                                        QUEUEBERT_QUEUES="killdef", QUEUEBERT_HEARTBEAT_INTERVAL=default_beat,
                                        QUEUEBERT_MAX_BATCH_SIZE="4", QUEUEBERT_MAX_POOL_ITEMS="8"))
               for name in ("killdef-a", "killdef-b")}
    gateway, base = start_gateway(redis_server.url, "killdef")  # the default request timeout
    _keep(gateway)
    _wait_for(lambda: conn.scard("rq:workers:killdef") == 2 and _healthy(base), "both workers serving", 120)
    held_at_kill: list[int] = []

    def kill_when_holding() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            held = _holding(conn, "killdef-a")
            if held:
                workers["killdef-a"].send_signal(signal.SIGKILL)
                held_at_kill.append(held)
                return
            time.sleep(0.01)

    # Four texts per request: each request is one job of its own, so the jobs spread over both workers.
    bodies = [{"inputs": [[f"request {i} text {k}: the food was fine"] for k in range(4)]} for i in range(24)]
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        killer = pool.submit(kill_when_holding)
        responses = list(pool.map(lambda body: _timed("POST", f"{base}/predict", json=body), bodies))
        killer.result()
    statuses = [r.status_code if isinstance(r, httpx.Response) else repr(r) for _, r in responses]
    assert held_at_kill and held_at_kill[0] > 0, f"worker a never held a job: {Counter(statuses)}"
    assert workers["killdef-a"].wait(10) == -signal.SIGKILL
    slowest = max(s for s, _ in responses)
    print(f"worker SIGKILLed holding {held_at_kill[0]} jobs: statuses {dict(Counter(statuses))}, "
          f"slowest {slowest:.1f} s (request timeout {GatewaySettings().request_timeout:g} s)")
    assert statuses == [200] * len(bodies)
