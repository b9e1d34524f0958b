"""The worker's /readyz and /livez (worker/probes.py), what a Kubernetes readiness and liveness
probe reads: a real `queuebert worker` process against a real redis-server started here, which the
test makes refuse writes (the worker cannot register), freezes (SIGSTOP: the heartbeat stalls)
and thaws."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from producer.embedded_redis import RedisServer
from queuebert.procs import free_port
from queuebert.settings import WorkerSettings

from helpers import reap, start_worker


@pytest.fixture()
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone: it gets frozen, which the session's must never be."""
    with RedisServer() as server:
        yield server


def probe(base: str, path: str) -> tuple[int | None, str]:
    """(status, reason) of a probe; (None, error) while nothing answers on the port."""
    try:
        r = httpx.get(base + path, timeout=2)
    except httpx.TransportError as exc:
        return None, type(exc).__name__
    return r.status_code, json.loads(r.text)["reason"]


def wait_for(check: Callable[[], tuple[int | None, str]], status: int, timeout: float, what: str,
             proc: subprocess.Popen[bytes] | None = None) -> str:
    deadline = time.monotonic() + timeout
    last: tuple[int | None, str] = (None, "")
    while time.monotonic() < deadline:
        last = check()
        if last[0] == status:
            return last[1]
        if proc is not None:
            assert proc.poll() is None, f"worker exited ({proc.returncode}) while waiting for {what}"
        time.sleep(0.1)
    raise AssertionError(f"{what}: still {last} after {timeout} s")


def test_readiness_follows_registration_liveness_follows_the_heartbeat(own_redis: RedisServer,
                                                                       tiny_models: dict[str, Path]) -> None:
    conn = redis.Redis.from_url(own_redis.url)
    # Redis refuses every write (as a master missing its replicas does): the worker loads its model
    # and serves its port, but cannot register, and waits (weather, not a crash).
    conn.config_set("min-replicas-to-write", 1)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        worker = start_worker(own_redis.url, tiny_models["bert"], "probed", QUEUEBERT_METRICS_PORT=str(port),
                              QUEUEBERT_LIVENESS_TIMEOUT="3")
        procs.append(worker)
        wait_for(lambda: probe(base, "/livez"), 200, 90, "the probe port", worker)
        assert probe(base, "/readyz") == (503, "not registered yet")
        assert probe(base, "/livez") == (200, "starting")
        assert b"queuebert_items_total" in httpx.get(base + "/metrics", timeout=2).content  # metrics unchanged

        conn.config_set("min-replicas-to-write", 0)
        assert wait_for(lambda: probe(base, "/readyz"), 200, 15, "registration", worker) == "serving default"
        assert conn.sismember("rq:workers", "rq:worker:probed")  # ready means registered, in Redis
        assert probe(base, "/livez")[0] == 200

        # Frozen Redis: the heartbeat thread blocks mid-command, its last beat ages past the timeout.
        assert own_redis.process is not None
        own_redis.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            reason = wait_for(lambda: probe(base, "/livez"), 503, 15, "liveness to fail on a stalled heartbeat")
            assert reason.startswith("no heartbeat for"), reason
            assert time.monotonic() - started >= 2  # not before the timeout (3 s from the last beat)
            assert probe(base, "/readyz")[0] == 200  # readiness is registration, not Redis's health
        finally:
            own_redis.process.send_signal(signal.SIGCONT)
        assert wait_for(lambda: probe(base, "/livez"), 200, 15, "liveness once Redis answers").startswith("heartbeat")

        # A stopping worker is no longer ready at once, then goes away.
        worker.send_signal(signal.SIGTERM)
        status, reason = probe(base, "/readyz")
        assert status in (503, None), (status, reason)
        assert worker.wait(timeout=20) == 0
        assert probe(base, "/readyz")[0] is None
    finally:
        reap(procs)
        conn.close()


def test_liveness_fails_when_a_worker_thread_has_ended(conn: redis.Redis, engines: dict[str, Any]) -> None:
    """A thread that is no longer alive, or a thread that died of a bug, fails liveness (the real
    worker object, its real probes; the threads are stand-ins that have ended)."""
    from worker.batch_worker import BatchWorker
    from worker.probes import WorkerProbes

    s = WorkerSettings(heartbeat_interval=1)
    w = BatchWorker(s.queues, connection=conn, settings=s, engine=engines["bert"], name="probe-unit")
    probes = WorkerProbes(w)
    w.assemble()
    assert probes.ready() == (False, "not registered yet")
    w.register_birth()  # sets RQ's last_heartbeat, as _register does
    alive, ended = threading.Event(), threading.Thread(target=lambda: None, name="qb-take")
    ended.start()
    ended.join()
    keeper = threading.Thread(target=alive.wait, name="qb-heartbeat")
    keeper.start()
    try:
        w.loops.append(keeper)
        assert probes.ready()[0] and probes.live()[0]
        w.loops.append(ended)
        assert probes.live() == (False, "thread(s) ended: qb-take")
        w.fatal = RuntimeError("boom")
        assert probes.live() == (False, "a worker thread died: RuntimeError('boom')")
    finally:
        alive.set()
        keeper.join()
        w.register_death()
