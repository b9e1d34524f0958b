"""What a new user's first mistakes must not cost: orphaned workers, lost results, hangs, tracebacks.

Each test names what the command did before: `queuebert run` killed left its workers running for
ever; an output that was the input, or a re-run of a finished run, emptied a file with exit 0; a
negative --max-pending or --workers 0 without a Redis URL hung; bad values gave tracebacks that named
no setting.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import PYTHON, REPO
from helpers import run_burst

QB = [PYTHON, "-m", "queuebert_cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUEBERT_")}
    env["PYTHONPATH"] = str(REPO)
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _qb(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QB, *args], capture_output=True, text=True, env=_env(**env), cwd=REPO, timeout=timeout)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is not running
    except FileNotFoundError:
        return False


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _kill(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _big_input(tmp_path: Path) -> Path:
    big = tmp_path / "big.txt"
    big.write_text("".join(f"line {i} " + "text " * (i % 30) + "\n" for i in range(50_000)))
    return big


def _registered_workers(url: str) -> int:
    with redis.Redis.from_url(url) as r:
        return int(r.scard("rq:workers"))


# -- 1. workers die with `queuebert run` ---------------------------------------------------------

def test_sigkilled_run_takes_its_workers_with_it(conn, redis_server, tiny_models, tmp_path):
    """SIGKILL leaves no handler to run: the workers must get their stop from the kernel
    (PR_SET_PDEATHSIG). Before, they were re-parented to PID 1 and kept serving for ever."""
    log = open(tmp_path / "run.log", "w")
    run = subprocess.Popen([*QB, "run", str(_big_input(tmp_path)), "-o", str(tmp_path / "out.jsonl"),
                            "--redis-url", redis_server.url, "--workers", "1", "--model", str(tiny_models["bert"]),
                            "--dtype", "float32", "--max-pending", "500", "--no-progress", "--log-format", "json"],
                           stdout=subprocess.DEVNULL, stderr=log, env=_env(QUEUEBERT_STOP_TIMEOUT="2"), cwd=REPO)
    workers: list[int] = []
    try:
        workers = _wait(lambda: _children(run.pid), 60, "the worker process")
        _wait(lambda: _registered_workers(redis_server.url), 60, "the worker to register")
        run.kill()
        run.wait(10)
        gone = [_wait(lambda p=p: not _alive(p), 20, f"worker {p} to exit") if _alive(p) else True for p in workers]
        assert all(gone)
    finally:
        _kill([run.pid, *workers])
        run.wait(10)
        log.close()


def test_sigterm_stops_the_workers_and_redis_then_exits_143(tiny_models, tmp_path):
    """SIGTERM (kill, a container stop) unwinds `run` as Ctrl-C does: workers stopped in order,
    the embedded Redis stopped, exit 143. Before, `run` died at once and its cleanup never ran."""
    log_path = tmp_path / "run.log"
    log = open(log_path, "w")
    run = subprocess.Popen([*QB, "run", str(_big_input(tmp_path)), "-o", str(tmp_path / "out.jsonl"),
                            "--workers", "1", "--model", str(tiny_models["bert"]), "--dtype", "float32",
                            "--max-pending", "500", "--no-progress", "--log-format", "json"],
                           stdout=subprocess.DEVNULL, stderr=log, env=_env(QUEUEBERT_STOP_TIMEOUT="2"), cwd=REPO)
    children: list[int] = []
    try:
        started = _wait(lambda: next((json.loads(line) for line in log_path.read_text().splitlines()
                                      if "started embedded redis" in line), None), 60, "the embedded redis")
        _wait(lambda: _registered_workers(started["url"]), 60, "the worker to register")
        children = _children(run.pid)
        assert started["pid"] in children and len(children) == 2  # Redis and one worker
        run.send_signal(signal.SIGTERM)
        assert run.wait(40) == 143
        assert not [p for p in children if _alive(p)], "a child of run outlived it"
        stderr = log_path.read_text()
        assert "Traceback" not in stderr and "SIGTERM" in stderr
    finally:
        _kill([run.pid, *children])
        run.wait(10)
        log.close()


# -- 2. no silent data loss ------------------------------------------------------------------------

def test_output_that_is_the_input_is_refused(redis_server, tmp_path):
    """`run same.jsonl -o same.jsonl` opened the output (truncating the input) before reading."""
    same = tmp_path / "same.jsonl"
    same.write_text('{"text": "precious"}\n')
    link = tmp_path / "link.jsonl"
    link.symlink_to(same)
    for out in (same, link):
        proc = _qb("run", str(same), "-o", str(out), "--redis-url", redis_server.url, "--workers", "0",
                   "--no-progress", "--log-format", "json")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "is the input" in proc.stderr and "Traceback" not in proc.stderr
        assert same.read_text() == '{"text": "precious"}\n'


def test_unwritable_output_fails_before_anything_starts(tmp_path):
    """`-o /nonexistent/x` failed only after Redis, the model build and the workers had started."""
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    proc = _qb("run", str(src), "-o", str(tmp_path / "no" / "such" / "dir" / "out.jsonl"),
               "--model", "/no/such/model", "--no-progress", "--log-format", "json")
    assert proc.returncode == 2
    assert "No such file or directory" in proc.stderr and "out.jsonl" in proc.stderr
    assert "started embedded redis" not in proc.stderr and "Traceback" not in proc.stderr


def test_rerun_of_a_consumed_run_is_refused_and_keeps_the_output(conn, redis_server, engines, tmp_path):
    """A finished run whose results `run` read (and deleted) has nothing left to read: running
    it again truncated out.jsonl to 0 lines with exit 0, and `results` printed nothing, exit 0."""
    src = tmp_path / "in.txt"
    src.write_text("".join(f"text {i}\n" for i in range(10)))
    out = tmp_path / "out.jsonl"
    enq = _qb("enqueue", str(src), "--run-id", "done-run", "--redis-url", redis_server.url, "--log-format", "json")
    assert enq.returncode == 0, enq.stderr[-2000:]
    run_burst(conn, engines["bert"])
    args = ["run", str(src), "-o", str(out), "--redis-url", redis_server.url, "--workers", "0", "--run-id",
            "done-run", "--no-progress", "--log-format", "json"]
    first = _qb(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    written = out.read_text()
    assert len(written.splitlines()) == 10
    again = _qb(*args)
    assert again.returncode == 2
    assert "run done-run was already read and its results deleted; use a new --run-id" in again.stderr
    assert out.read_text() == written
    results = _qb("results", "done-run", "-o", str(out), "--redis-url", redis_server.url, "--log-format", "json")
    assert results.returncode == 2 and "already read and its results deleted" in results.stderr
    assert out.read_text() == written


def test_output_file_is_emptied_only_at_its_first_line(tmp_path):
    """An existing results file survives a command that fails before it has anything to write,
    and a file the command created for nothing is removed again."""
    from producer.outputs import open_output

    old = tmp_path / "old.jsonl"
    old.write_text("kept\n")
    with pytest.raises(RuntimeError), open_output(str(old)):
        raise RuntimeError("failed before the first result")
    assert old.read_text() == "kept\n"
    new = tmp_path / "new.jsonl"
    with pytest.raises(RuntimeError), open_output(str(new)):
        raise RuntimeError("failed before the first result")
    assert not new.exists()
    with pytest.raises(RuntimeError), open_output(str(old)) as out:
        out.write("a\n")
        raise RuntimeError("failed after a line: it may be the only copy")
    assert old.read_text() == "a\n"
    with open_output(str(old)):
        pass  # a command with no results at all: the file says so
    assert old.read_text() == ""


def test_python_client_refuses_to_enqueue_into_a_consumed_run(conn, engines):
    """A library caller resuming a consumed run got "nothing to enqueue" and no results, ever."""
    from producer import Client, ResumeError

    client = Client(conn)
    client.enqueue_stream(["a", "b"], run_id="consumed")
    run_burst(conn, engines["bert"])
    assert len(list(client.ordered_results("consumed", timeout=10, consume=True))) == 2
    assert client.run_progress("consumed")["consumed"] == 1
    with pytest.raises(ResumeError, match="already read and its results deleted"):
        client.enqueue_stream(["a", "b"], run_id="consumed")


# -- 3. values that hung for ever --------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--workers", "-1"], "--workers must be at least 0 (got -1)"),
    (["--max-pending", "-1"], "--max-pending must be at least 0 (got -1)"),
    (["--chunk-size", "0"], "--chunk-size must be at least 1 (got 0)"),
    (["--chunk-size", "-5"], "--chunk-size must be at least 1 (got -5)"),
])
def test_out_of_range_flags_are_one_line(redis_server, tmp_path, flags, message):
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    proc = _qb("run", str(src), "--redis-url", redis_server.url, "--workers", "0", *flags, "--no-progress",
               "--log-format", "json", timeout=20)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"queuebert run: error: {message}"]


def test_workers_0_without_a_redis_url_is_refused(tmp_path):
    """Its private Redis is on a port no worker knows: the run waited for ever."""
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    proc = _qb("run", str(src), "--workers", "0", "--no-progress", "--log-format", "json", timeout=20)
    assert proc.returncode == 2
    assert "--workers 0" in proc.stderr and "--redis-url" in proc.stderr and "Traceback" not in proc.stderr


def test_out_of_range_environment_is_refused(redis_server, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    proc = _qb("enqueue", str(src), "--redis-url", redis_server.url, QUEUEBERT_MAX_PENDING="-1", timeout=20)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["queuebert enqueue: error: QUEUEBERT_MAX_PENDING must be at "
                                                "least 0 (got -1)"]


def test_python_clients_refuse_out_of_range_settings(conn, redis_server):
    """`enqueue_stream(max_pending=-1)` looped `while pending > max_pending` for ever."""
    import asyncio

    from producer import AsyncClient, Client, ClientSettings, SettingError

    client = Client(conn)
    with pytest.raises(SettingError, match=r"^max_pending must be at least 0 \(got -1\)"):
        client.enqueue_stream(["a"], max_pending=-1)
    with pytest.raises(SettingError, match=r"^chunk_size must be at least 1 \(got 0\)"):
        client.enqueue_stream(["a"], chunk_size=0)
    with pytest.raises(SettingError, match="chunk_size"):
        ClientSettings(chunk_size=-5)
    with pytest.raises(SettingError, match=r"^QUEUEBERT_MAX_PENDING must be at least 0 \(got -1\)"):
        ClientSettings.from_env({"QUEUEBERT_MAX_PENDING": "-1"})

    async def async_side() -> None:
        aclient = AsyncClient.from_url(redis_server.url)
        try:
            with pytest.raises(SettingError, match="max_pending"):
                await aclient.enqueue_stream(["a"], max_pending=-1)
        finally:
            await aclient.aclose()

    asyncio.run(async_side())
    assert conn.dbsize() == 0  # nothing was sent


# -- 5. messages that name the setting or the flag ----------------------------------------------

def test_bad_environment_value_names_the_variable(redis_server, tmp_path):
    """`invalid literal for int() with base 10: 'abc'` named neither the variable nor the type."""
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    proc = _qb("enqueue", str(src), "--redis-url", redis_server.url, QUEUEBERT_CHUNK_SIZE="abc", timeout=20)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["queuebert enqueue: error: QUEUEBERT_CHUNK_SIZE must be a whole "
                                                "number (got 'abc')"]


def test_rerank_with_a_model_that_is_no_reranker_names_the_flag(conn, redis_server, engines, tmp_path):
    """A 2-label classifier has no single relevance score: the error was a RerankError traceback
    whose hint named the library's keyword (label=...), not the command's --relevance-label."""
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"id": "q", "query": "battery", "passages": ["lasts", "dies"]}) + "\n")
    proc = subprocess.Popen([*QB, "rerank", str(queries), "--redis-url", redis_server.url, "--workers", "0",
                             "--no-progress", "--log-format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            run_burst(conn, engines["bert"])
            time.sleep(0.1)
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 2, err[-2000:]
    assert "Traceback" not in err and "label=..." not in err
    assert "a reranker scores with one logit; name the label that means relevant with --relevance-label" in err


# -- 7, 8 -------------------------------------------------------------------------------------------

def test_option_error_shows_the_subcommands_usage(tmp_path):
    proc = _qb("run", str(tmp_path / "in.txt"), "--top-k", "0", timeout=20)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: queuebert run ")
    assert "queuebert run: error: --top-k must be a positive integer" in proc.stderr


def test_job_error_is_exported():
    """The README tells Python users to catch JobError; `from producer import JobError` failed."""
    import producer
    from queuebert.schema import JobError

    assert producer.JobError is JobError and "JobError" in producer.__all__
