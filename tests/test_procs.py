"""The one way processes are started and stopped (queuebert.procs): logs in files, graceful then forced."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from queuebert.procs import free_port, start_process, stop_processes

# A child that logs on both streams, says when it is ready, and on SIGTERM either exits or ignores it.
CHILD = """
import signal, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("to stdout", flush=True)
print("ready", file=sys.stderr, flush=True)
time.sleep(60)
"""


def _wait_ready(path: Path) -> None:
    deadline = time.monotonic() + 30
    while "ready" not in path.read_text():
        assert time.monotonic() < deadline, "child did not start"
        time.sleep(0.02)


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_log_file_gets_stderr_and_stdout_only_when_asked(tmp_path):
    quiet = start_process([sys.executable, "-c", CHILD, "exit"], log_path=tmp_path / "quiet.log")
    merged = start_process([sys.executable, "-c", CHILD, "exit"], log_path=tmp_path / "merged.log", stdout="log")
    try:
        for proc in (quiet, merged):
            assert proc.log_path is not None
            _wait_ready(proc.log_path)
        assert (tmp_path / "quiet.log").read_text() == "ready\n"
        assert (tmp_path / "merged.log").read_text() == "to stdout\nready\n"
    finally:
        stop_processes([quiet, merged], grace=10)
    assert quiet.returncode == merged.returncode == -signal.SIGTERM


def test_stop_is_graceful_then_forced_with_one_shared_deadline(tmp_path):
    procs = [start_process([sys.executable, "-c", CHILD, mode], log_path=tmp_path / f"{i}.log", new_session=True)
             for i, mode in enumerate(["exit", "ignore", "ignore"])]
    for proc in procs:
        assert proc.log_path is not None
        _wait_ready(proc.log_path)
    started = time.monotonic()
    stop_processes(procs, grace=1.0)
    elapsed = time.monotonic() - started
    assert [p.returncode for p in procs] == [-signal.SIGTERM, -signal.SIGKILL, -signal.SIGKILL]
    assert elapsed < 1.9  # two stubborn children share the grace period rather than taking one each
    stop_processes(procs, grace=1.0)  # stopping what has already stopped is a no-op


# A parent that starts CHILD with stop_with_parent, prints the child's pid, then waits to be killed.
PARENT = """
import sys, time
from pathlib import Path
from queuebert.procs import start_process
child = start_process([sys.executable, "-c", sys.argv[1], "exit"], log_path=Path(sys.argv[2]),
                      new_session=True, stop_with_parent=sys.argv[3] == "1")
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("armed", [True, False])
def test_a_child_stops_with_its_killed_parent_only_when_asked(tmp_path, armed):
    """The supervisor starts its workers with stop_with_parent: SIGKILLed (the OOM killer), it
    leaves no worker running on with nobody to stop it. Without it, the child outlives the parent."""
    import subprocess

    log = tmp_path / "child.log"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(log), "1" if armed else "0"],
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        _wait_ready(log)
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(child) is not armed
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
