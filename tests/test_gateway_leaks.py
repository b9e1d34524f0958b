"""``queuebert serve``: nothing starves, nothing outlives its use (issue 23, findings 1, 6 and 7).
Real redis-server, real gateway and worker processes, real sockets; small limits through
``QUEUEBERT_*`` so each test takes seconds.

- Finding 1: result streams have a pool and a cap of their own; however many clients subscribe,
  the TEI routes and /health keep their connections.
- Finding 6: what a delivered answer needed leaves Redis; ``qb:runs`` stays bounded.
- Finding 7: the queued work of a client that went away is dropped, never a neighbour's.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from rq import Queue
from rq.registry import FinishedJobRegistry
from test_gateway_hostile import HANG_S, connect, head, start_gateway, tei_error

from queuebert import keys
from queuebert.procs import LoggedProcess
from queuebert.settings import DEFAULT_RESULT_TTL, GatewaySettings

from helpers import reap, start_worker

_started: list[LoggedProcess] = []


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    yield
    reap(_started)


def _keep(proc: LoggedProcess) -> LoggedProcess:
    _started.append(proc)
    return proc


def _wait_for(check: Callable[[], bool], what: str, timeout: float = HANG_S) -> float:
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - began


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _open(base: str, path: str) -> tuple[socket.socket, int, dict[str, str], bytes]:
    """A GET of ``path`` on a socket of its own, read up to the end of its headers (a stream stays
    open after them); its status (0: no answer within ``HANG_S``), headers and what followed them."""
    sock = connect(base)
    sock.sendall(head("GET", path))
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            got = sock.recv(65536)
        except TimeoutError:
            return sock, 0, {}, b""
        assert got, f"connection closed before a response: {data!r}"
        data += got
    top, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = top.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(rest) < int(headers.get("content-length", 0)):
        rest += sock.recv(65536)
    return sock, int(status_line.split()[1]), headers, rest


def _scores(response: httpx.Response) -> dict[str, float]:
    assert response.status_code == 200, response.text
    return {p["label"]: p["score"] for p in response.json()}


def _job_keys(conn: redis.Redis) -> list[bytes]:
    return [k for k in conn.scan_iter(match="rq:job:*", count=1000)]


# -- finding 1 ---------------------------------------------------------------------------------------

def test_idle_streams_never_starve_requests(redis_server, conn, tiny_models):
    """The requests' pool has 6 connections, streams may be 4 (QUEUEBERT_MAX_CONNECTIONS=6,
    QUEUEBERT_MAX_STREAMS=4). 18 clients open event and result streams on a run that never
    finishes (3x the requests' pool; the old gateway read them all through it and its requests
    waited 20 s for a connection): 4 are served, the other 14 get TEI's 429 at once, and
    meanwhile /predict and /health answer as usual. A closed stream frees its slot."""
    queue = "leaks-streams"
    _keep(start_worker(redis_server.url, tiny_models["bert"], "leaks-streams", QUEUEBERT_QUEUES=queue))
    gateway, base = start_gateway(redis_server.url, queue, QUEUEBERT_MAX_CONNECTIONS="6", QUEUEBERT_MAX_STREAMS="4")
    _keep(gateway)
    _wait_for(lambda: _healthy(base), "the worker to serve the queue", timeout=60)
    # A run that is open and never finishes: one job listed that no worker will ever complete.
    conn.hset(keys.run_meta("idle"), mapping={"jobs": 1, "enqueued": 1, "queue": queue})
    conn.rpush(keys.run_jobs("idle"), "never-enqueued")

    held: list[socket.socket] = []
    refused: list[tuple[int, dict[str, str], bytes]] = []
    try:
        with ThreadPoolExecutor(18) as pool:  # at once: the old gateway took 20 s per stream past its pool
            opened = list(pool.map(lambda n: _open(base, "/runs/idle/events" if n % 2 else "/runs/idle/results"),
                                   range(18)))
        for sock, status, headers, rest in opened:
            if status == 200:
                held.append(sock)
            else:
                refused.append((status, headers, rest))
                sock.close()
        time.sleep(1.5)  # every served stream is now in its blocking read

        began = time.monotonic()
        predicted = httpx.post(f"{base}/predict", json={"inputs": "still served"}, timeout=HANG_S)
        took = time.monotonic() - began
        assert predicted.status_code == 200 and took < 5, (predicted.status_code, predicted.text[:200], took)
        assert httpx.get(f"{base}/health", timeout=HANG_S).status_code == 200

        assert len(held) == 4 and len(refused) == 14, (len(held), [r[0] for r in refused])
        for status, headers, body in refused:
            error = tei_error((status, headers, body), 429)
            assert error["error_type"] == "Overloaded" and "QUEUEBERT_MAX_STREAMS" in error["error"], error
            assert headers["retry-after"] == "1"

        held.pop().close()  # its slot comes back once the gateway sees the client gone
        deadline = time.monotonic() + HANG_S
        while True:
            sock, status, _, _ = _open(base, "/runs/idle/events")
            if status == 200:
                held.append(sock)
                break
            sock.close()
            assert time.monotonic() < deadline, "a closed stream's slot never came back"
            time.sleep(0.1)
    finally:
        for sock in held:
            sock.close()


# -- finding 6 ---------------------------------------------------------------------------------------

def test_delivered_answers_leave_nothing_and_the_runs_index_is_bounded(redis_server, conn, tiny_models):
    """30 TEI requests (one-text ones coalesced from 8 threads, and batches of 2), all answered:
    then no job hash (input texts), RQ result, finished-registry entry or run stream, job list or
    done set of theirs is left, none of their runs is in ``qb:runs``, and what is left (each
    run's one-field tombstone) expires within the default ``answer_ttl``. RQ's own tools still
    read the queue. ``POST /runs`` keeps its documented 24 h; ``qb:runs`` keeps only the newest
    runs (QUEUEBERT_MAX_INDEXED_RUNS=3 here)."""
    queue = "leaks-retention"
    _keep(start_worker(redis_server.url, tiny_models["bert"], "leaks-retention", QUEUEBERT_QUEUES=queue))
    gateway, base = start_gateway(redis_server.url, queue, QUEUEBERT_MAX_INDEXED_RUNS="3")
    _keep(gateway)
    _wait_for(lambda: _healthy(base), "the worker to serve the queue", timeout=60)

    def ask(n: int) -> httpx.Response:
        inputs: object = [f"batch {n} one", f"batch {n} two"] if n % 3 == 0 else f"one text number {n}"
        return httpx.post(f"{base}/predict", json={"inputs": inputs}, timeout=HANG_S)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(30)))
    assert all(a.status_code == 200 for a in answers), [a.text[:100] for a in answers if a.status_code != 200]

    def nothing_left() -> bool:
        return not _job_keys(conn) and not list(conn.scan_iter(match="rq:results:*", count=1000))

    _wait_for(nothing_left, "the answered requests' jobs and results to go", timeout=5)
    assert FinishedJobRegistry(queue, connection=conn).get_job_ids() == []
    assert conn.zcard(keys.RUNS) == 0, conn.zrange(keys.RUNS, 0, -1)
    left = list(conn.scan_iter(match="qb:run:*", count=1000))
    assert left, "the runs' tombstones (a late duplicate completion must not reopen a run)"
    for key in left:
        assert key.endswith(b"}"), f"{key!r}: a run's stream, job list, done set or cursor outlived its answer"
        assert conn.hgetall(key) == {b"consumed": b"1"}
        assert 0 < conn.ttl(key) <= GatewaySettings().answer_ttl, (key, conn.ttl(key))
    assert Queue(queue, connection=conn).count == 0
    info = subprocess.run([str(_rq_cli()), "info", "--url", redis_server.url, queue], capture_output=True,
                          text=True, timeout=60, check=False)
    assert info.returncode == 0, info.stderr

    run_ids = []
    for n in range(5):
        created = httpx.post(f"{base}/runs", content=json.dumps({"id": "x", "text": f"run {n}"}) + "\n",
                             timeout=HANG_S)
        assert created.status_code == 201, created.text
        run_ids.append(created.json()["run_id"])
        time.sleep(0.01)  # distinct creation times
    assert [r.decode() for r in conn.zrange(keys.RUNS, 0, -1)] == run_ids[-3:]
    for run_id in run_ids:  # the durable API keeps its runs as documented, indexed or not
        assert conn.ttl(keys.run_meta(run_id)) > DEFAULT_RESULT_TTL - 600


def _rq_cli() -> Path:
    """RQ's own command line, from the environment the tests run in."""
    from conftest import PYTHON

    return Path(PYTHON).parent / "rq"


# -- finding 7 ---------------------------------------------------------------------------------------

def test_queued_work_of_clients_that_went_away_is_dropped(redis_server, conn, tiny_models):
    """No worker at first. 20 clients give up on their requests after 0.5 s: their jobs leave the
    queue unstarted and nothing of theirs stays (the old gateway left them queued, to be computed
    and kept for 24 h). Then 6 concurrent requests, 3 of which give up: a job shared with a client
    that stays is kept, and once a worker starts, each of the 3 that stayed gets its own text's
    answer (the same scores as asking again alone) and nothing is left behind."""
    queue = "leaks-gone"
    gateway, base = start_gateway(redis_server.url, queue)
    _keep(gateway)
    queued = Queue(queue, connection=conn)

    def give_up(text: str) -> None:
        try:
            httpx.post(f"{base}/predict", json={"inputs": text}, timeout=0.5)
        except httpx.TimeoutException:
            return
        raise AssertionError("answered with no worker running")

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(give_up, [f"abandoned request {n}" for n in range(20)]))
    _wait_for(lambda: queued.count == 0 and not _job_keys(conn), "the abandoned jobs to leave the queue", timeout=5)
    metrics = httpx.get(f"{base}/metrics").text
    assert 'queuebert_gateway_requests_total{route="/predict",status="499"} 20.0' in metrics

    patient_texts = [f"a patient client {n} " + "good " * n for n in range(3)]
    with ThreadPoolExecutor(6) as pool:
        patient = [pool.submit(httpx.post, f"{base}/predict", json={"inputs": t}, timeout=60) for t in patient_texts]
        list(pool.map(give_up, [f"an impatient client {n}" for n in range(3)]))
        time.sleep(0.5)
        assert 1 <= queued.count <= 3, queued.count  # only jobs a patient client still waits for
        _keep(start_worker(redis_server.url, tiny_models["bert"], "leaks-gone", QUEUEBERT_QUEUES=queue))
        answers = [_scores(f.result()) for f in patient]
    for text, got in zip(patient_texts, answers):
        alone = _scores(httpx.post(f"{base}/predict", json={"inputs": text}, timeout=HANG_S))
        assert got.keys() == alone.keys()
        assert all(abs(got[label] - alone[label]) < 1e-5 for label in got), (text, got, alone)
    _wait_for(lambda: not _job_keys(conn) and queued.count == 0, "every job to go once answered", timeout=5)
