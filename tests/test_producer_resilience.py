"""Producers and readers under trouble: a full Redis, a killed or interrupted enqueue, a lost reply,
a killed consuming reader, a run whose producer died. Nothing is lost, nothing enqueued twice."""

from __future__ import annotations

import base64
import json
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from rq.job import Job
from structlog.testing import capture_logs

from producer import Client
from producer.embedded_redis import RedisServer
from queuebert import keys
from queuebert.serializer import JSONSerializer

from conftest import PYTHON, REPO, subprocess_env
from helpers import run_burst

QB = [PYTHON, "-m", "queuebert_cli"]


def _enqueued_items(conn: redis.Redis, run_id: str, queue: str = "default") -> list[dict[str, Any]]:
    """The items of a run as Redis holds them: its job list, in order, through each job's payload.
    Also checks that the queue and the run list every job once."""
    job_ids = [j.decode() for j in conn.lrange(keys.run_jobs(run_id), 0, -1)]
    assert len(job_ids) == len(set(job_ids)), "a job is listed twice in the run"
    queued = Counter(j.decode() for j in conn.lrange(f"rq:queue:{queue}", 0, -1))
    assert not [j for j, n in queued.items() if n > 1], "a job is queued twice"
    assert set(queued) == set(job_ids), "the queue and the run's job list differ"
    jobs = Job.fetch_many(job_ids, connection=conn, serializer=JSONSerializer)
    assert all(job is not None for job in jobs), "a listed job has no job hash"
    return [item for job in jobs for item in job.kwargs["items"]]  # type: ignore[union-attr]


def _died_after(n: int) -> Iterator[str]:
    """The input of a producer that dies after ``n`` items: its run stays unsealed."""
    for i in range(n):
        yield f"text {i} " + "word " * (i % 5)
    raise RuntimeError("the producer died")


# -- a full Redis ---------------------------------------------------------------------------------


def test_full_redis_waits_gives_up_clearly_and_resumes(tmp_path):
    from producer import RedisFull

    n = 40_000
    # Random text: RQ compresses job payloads, and repeated text would shrink to nothing.
    rng = random.Random(7)
    texts = [f"{i:05d} " + base64.b64encode(rng.randbytes(90)).decode() for i in range(n)]  # 10x maxmemory
    with RedisServer(extra_args=["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"]) as server:
        client = Client.from_url(server.url, redis_full_timeout=1.5)
        conn = client.connection
        started = time.monotonic()
        with capture_logs() as logs, pytest.raises(RedisFull) as caught:
            client.enqueue_stream(texts, run_id="full", chunk_size=50, max_pending=0)
        waited = time.monotonic() - started
        full_lines = [e for e in logs if e["event"].startswith("Redis is full (maxmemory 3.00M)")]
        assert len(full_lines) == 1, [e["event"] for e in logs]
        assert full_lines[0]["event"] == "Redis is full (maxmemory 3.00M): waiting for results to be consumed"
        message = str(caught.value)
        went_in = caught.value.enqueued
        assert 0 < went_in < n and went_in % 50 == 0
        assert "OOM" in message and "maxmemory" in message and "run full" in message
        assert f"{went_in} items enqueued" in message and "--run-id full" in message
        assert 1.5 <= waited < 15
        assert int(conn.hget(keys.run_meta("full"), "enqueued")) == went_in  # the failed round left nothing
        assert conn.hget(keys.run_meta("full"), "sealed") is None

        conn.config_set("maxmemory", "0")  # room again (as if a consuming reader had caught up)
        run = client.enqueue_stream(texts, run_id="full", chunk_size=50, max_pending=0)
        assert (run.enqueued, run.skipped, run.jobs) == (n, went_in, n // 50)
        items = _enqueued_items(conn, "full")
        assert [it["id"] for it in items] == [str(i) for i in range(n)]
        assert [it["text"] for it in items] == texts
        assert client.run_progress("full")["sealed"] == 1 and client.run_progress("full")["total"] == n


# -- a killed enqueue -----------------------------------------------------------------------------


def test_sigkilled_cli_enqueue_resumes_every_line_once_in_order(conn, redis_server, engines, tmp_path):
    n = 20_000
    src = tmp_path / "in.jsonl"
    texts = [f"line {i} " + "so so " * (i % 7) for i in range(n)]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    env = subprocess_env(redis_server.url)
    # No worker runs, so --max-pending stops it at 10,240 items at the latest: the kill always comes
    # before the end, and mostly while rounds are on the wire.
    cmd = [*QB, "enqueue", str(src), "--chunk-size", "64", "--no-progress", "--log-format", "json"]
    stderr_path = tmp_path / "first.err"
    with open(stderr_path, "wb") as err:
        first = subprocess.Popen([*cmd, "--max-pending", "10000"], env=env, cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=err)
    try:
        deadline = time.monotonic() + 30
        run_id = None
        while time.monotonic() < deadline:
            if run_id is None:
                for line in stderr_path.read_text().splitlines():
                    record = json.loads(line)
                    if record.get("event") == "enqueueing":
                        run_id = record["run"]
            if run_id is not None and int(conn.hget(keys.run_meta(run_id), "enqueued") or 0) >= 8_000:
                break
            time.sleep(0.005)
        else:
            pytest.fail(f"the enqueue did not get going: {stderr_path.read_text()[-2000:]}")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.stdout is not None and first.stdout.read() == b""  # killed before it printed the id
    went_in = int(conn.hget(keys.run_meta(run_id), "enqueued"))
    assert 8_000 <= went_in < n and conn.hget(keys.run_meta(run_id), "sealed") is None

    resumed = subprocess.run([*cmd, "--run-id", run_id, "--max-pending", "0"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.strip() == run_id
    items = _enqueued_items(conn, run_id)
    assert [it["id"] for it in items] == [str(i) for i in range(n)]
    assert [it["text"] for it in items] == texts
    assert Client.from_url(redis_server.url).run_progress(run_id) | {"done": 0} == {
        "enqueued": n, "total": n, "done": 0, "errors": 0, "sealed": 1, "jobs": (n + 63) // 64, "consumed": 0}

    run_burst(conn, engines["bert"])
    results = list(Client.from_url(redis_server.url).ordered_results(run_id, timeout=30))
    assert [r["id"] for r in results] == [str(i) for i in range(n)]
    assert not [r for r in results if "error" in r]


def test_cli_enqueue_ends_a_full_redis_and_ctrl_c_with_one_resumable_line(tmp_path):
    src = tmp_path / "in.txt"
    rng = random.Random(3)
    src.write_text("".join(base64.b64encode(rng.randbytes(90)).decode() + "\n" for _ in range(20_000)))
    with RedisServer(extra_args=["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]) as server:
        env = subprocess_env(server.url)
        cmd = [*QB, "enqueue", str(src), "--no-progress", "--log-format", "json"]
        full = subprocess.run([*cmd, "--run-id", "cli-full", "--redis-full-timeout", "1"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert full.returncode == 3, full.stderr[-2000:]
        assert "Traceback" not in full.stderr and full.stdout == ""
        errors = [json.loads(line) for line in full.stderr.splitlines() if '"error"' in line]
        assert len(errors) == 1 and "--run-id cli-full" in errors[0]["event"] and "OOM" in errors[0]["event"]

        # Ctrl-C while it waits for room: one line, exit 130.
        interrupted = subprocess.Popen([*cmd, "--run-id", "cli-full"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = interrupted.stderr.readline()  # type: ignore[union-attr]
            if "Redis is full" in line:
                break
        interrupted.send_signal(signal.SIGINT)
        _out, err = interrupted.communicate(timeout=30)
        assert interrupted.returncode == 130, err
        assert "Traceback" not in err and "interrupted: run cli-full" in err and "--run-id cli-full" in err

        redis.Redis.from_url(server.url).config_set("maxmemory", "0")
        done = subprocess.run([*cmd, "--run-id", "cli-full"], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and done.stdout.strip() == "cli-full", done.stderr[-2000:]
        items = _enqueued_items(redis.Redis.from_url(server.url), "cli-full")
        assert [it["id"] for it in items] == [str(i) for i in range(20_000)]


def test_resuming_a_sealed_run_sends_nothing(conn, redis_server):
    from producer import ResumeError

    client = Client.from_url(redis_server.url)
    texts = [f"t{i}" for i in range(100)]
    client.enqueue_stream(texts, run_id="sealed", chunk_size=8)
    before = conn.llen("rq:queue:default")
    seen: list[int] = []
    run = client.enqueue_stream(texts, run_id="sealed", chunk_size=8, on_progress=seen.append)
    assert (run.enqueued, run.skipped, run.jobs, seen) == (100, 100, 13, [100])
    assert conn.llen("rq:queue:default") == before
    with pytest.raises(ResumeError, match="not the input"):
        client.enqueue_stream(texts[:50], run_id="sealed", chunk_size=8)


# -- a lost reply ---------------------------------------------------------------------------------


def test_lost_reply_of_a_round_enqueues_nothing_twice(conn, redis_server, monkeypatch):
    """Redis applies a round, then the connection drops before its reply is read."""
    client = Client.from_url(redis_server.url)
    run_id = "lost-reply"
    marker = keys.run_jobs(run_id).encode()
    state = {"armed": True, "fired": 0}
    send, read = redis.connection.Connection.send_packed_command, redis.connection.Connection.read_response

    def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
        packed = b"".join(bytes(c) for c in command) if isinstance(command, list) else bytes(command)
        if state["armed"] and marker in packed:
            self._qb_lose_reply = True  # the first round's packet: lose its last reply
        return send(self, command, check_health)

    def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        response = read(self, *args, **kwargs)
        # The round's last reply is its first array (EXEC's, or the plain pipeline's HMGET).
        if getattr(self, "_qb_lose_reply", False) and isinstance(response, list):
            self._qb_lose_reply = state["armed"] = False
            state["fired"] += 1
            self.disconnect()
            raise redis.ConnectionError("injected: connection lost before the reply was read")
        return response

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", send_packed_command)
    monkeypatch.setattr(redis.connection.Connection, "read_response", read_response)
    texts = [f"reply {i}" for i in range(100)]
    run = client.enqueue_stream(texts, run_id=run_id, chunk_size=4)
    monkeypatch.undo()
    assert state["fired"] == 1
    items = _enqueued_items(conn, run_id)
    assert [it["id"] for it in items] == [str(i) for i in range(100)]
    assert (run.enqueued, run.jobs) == (100, 25)
    assert client.run_progress(run_id)["enqueued"] == 100 and client.run_progress(run_id)["jobs"] == 25


# -- readers --------------------------------------------------------------------------------------


def _unsealed_done_run(conn: redis.Redis, url: str, engines: dict[str, Any], run_id: str, n: int) -> None:
    """A run whose producer died after ``n`` one-item jobs (whole rounds of 16), all of them done."""
    with pytest.raises(RuntimeError, match="the producer died"):
        Client.from_url(url).enqueue_stream(_died_after(n), run_id=run_id, chunk_size=1, max_pending=0)
    assert conn.llen(keys.run_jobs(run_id)) == n and conn.hget(keys.run_meta(run_id), "sealed") is None
    run_burst(conn, engines["bert"])
    assert int(conn.hget(keys.run_meta(run_id), "done")) == n


def test_killed_consuming_reader_loses_nothing(conn, redis_server, engines, tmp_path: Path):
    # The reader deletes after every 256 jobs; at 512 its last deletion is followed by a wait for
    # jobs the dead producer never lists, with the lines before it in the file's buffer, if nothing
    # flushed them.
    n = 512
    _unsealed_done_run(conn, redis_server.url, engines, "consumed", n)
    out = tmp_path / "out.jsonl"
    env = subprocess_env(redis_server.url)
    reader = subprocess.Popen([*QB, "results", "consumed", "--follow", "--consume", "-o", str(out),
                               "--log-format", "json"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while conn.xlen(keys.run_stream("consumed")) > 0:
            assert time.monotonic() < deadline, "the reader did not consume"
            assert reader.poll() is None, reader.stderr.read() if reader.stderr else ""
            time.sleep(0.02)
        time.sleep(0.3)
        reader.send_signal(signal.SIGKILL)
        reader.wait(timeout=10)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    in_file = set()
    for line in out.read_text().splitlines():
        try:
            in_file.add(json.loads(line)["id"])
        except ValueError:
            pass  # a line cut by the kill: its item is still in Redis
    again = subprocess.run([*QB, "results", "consumed"], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=30)
    assert again.returncode == 0, again.stderr
    in_redis = {json.loads(line)["id"] for line in again.stdout.splitlines()}
    lost = sorted(set(str(i) for i in range(n)) - in_file - in_redis, key=int)
    assert not lost, f"{len(lost)} items neither in the file nor in Redis: {lost[:5]}..."


def test_follow_timeout_ends_a_run_whose_producer_died(conn, redis_server, engines, tmp_path: Path):
    _unsealed_done_run(conn, redis_server.url, engines, "orphan", 32)
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    try:
        res = subprocess.run([*QB, "results", "orphan", "--follow", "--timeout", "2", "-o", str(out),
                              "--log-format", "json"], env=subprocess_env(redis_server.url), cwd=REPO,
                             capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("results --follow --timeout 2 still waiting after 30 s")
    assert res.returncode == 3, res.stderr
    assert time.monotonic() - started < 15
    assert "timed out" in res.stderr
    assert len(out.read_text().splitlines()) == 32  # what there was is written before it gives up
