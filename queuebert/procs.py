"""Child processes and loopback ports: the one way queuebert starts and stops what it runs.

``queuebert run`` (its workers), the device supervisor (one worker per device), the benchmark and
the tests all start other processes and must stop them on every exit path. They share these
rules:

- A child's log goes to a file, never to a pipe: a pipe that nobody drains fills up and blocks
  the child in the middle of its work.
- A child's stdout goes nowhere unless asked for, so it can never mix into the parent's own data
  output (``queuebert run`` writes results on stdout).
- A stop is graceful first (SIGTERM: a worker finishes or gives back what it holds), then forced
  (SIGKILL) once a grace period is over. Several children are signalled together and share one
  deadline, so stopping N of them takes one grace period, not N.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import structlog

log = structlog.get_logger(__name__)

Stdout = Literal["devnull", "log", "inherit"]


class LoggedProcess(subprocess.Popen[bytes]):
    """A child process that knows where its log is (``log_path``; None when it writes to ours)."""

    log_path: Path | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on at the moment of the call.

    The operating system picks it; another process could take it before the caller binds it, which
    on a loopback interface of one test or one ``queuebert run`` is rare enough to accept.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _stop_with_parent(parent: int) -> Callable[[], None]:
    """For ``preexec_fn``: the child gets SIGTERM (a graceful stop) when the thread that started it
    dies, however it dies (Linux's PR_SET_PDEATHSIG), so a SIGKILLed parent leaves no orphans that
    keep running without anyone to stop them."""
    # libc is looked up here, in the parent: a dlopen between fork and exec could wait for ever on a
    # loader lock that another thread of the parent (a model build's, say) held at the fork.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)
    return arm


def start_process(cmd: Sequence[str], *, log_path: Path | None = None, stdout: Stdout = "devnull",
                  env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
                  new_session: bool = False, stop_with_parent: bool = False) -> LoggedProcess:
    """Start ``cmd`` with its stderr in ``log_path`` (created or truncated), or in ours when None.

    ``stdout``: "devnull" (default), "log" (into the same file as stderr) or "inherit".
    ``new_session``: the child leads its own session and process group, so a Ctrl-C at the terminal
    reaches only the parent, which then stops its children in order instead of all of them at once.
    ``stop_with_parent`` (Linux; ignored elsewhere): SIGTERM to the child when this thread dies.
    Only for a parent with no other threads: ``preexec_fn`` runs between fork and exec.
    """
    if stdout == "log" and log_path is None:
        raise ValueError('stdout="log" needs a log_path')
    log_file = open(log_path, "wb") if log_path is not None else None
    try:
        out = {"devnull": subprocess.DEVNULL, "log": log_file, "inherit": None}[stdout]
        # The child gets its own copy of the file descriptor; ours is closed once it has started.
        preexec = _stop_with_parent(os.getpid()) if stop_with_parent and sys.platform == "linux" else None
        proc = LoggedProcess(list(cmd), stdout=out, stderr=log_file, env=dict(env) if env is not None else None,
                             cwd=str(cwd) if cwd is not None else None, start_new_session=new_session,
                             preexec_fn=preexec)
    finally:
        if log_file is not None:
            log_file.close()
    proc.log_path = log_path
    return proc


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], grace: float, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to every child still running, wait up to ``grace`` seconds for all of them
    together, then SIGKILL the ones left; returns when every one has exited and been reaped."""
    procs = list(procs)
    for proc in procs:
        proc.send_signal(sig)  # a no-op for a child that has exited (and been reaped)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("process did not stop in time: killing it", pid=proc.pid, grace_s=grace)
            kill_processes([proc])
            proc.wait()


def stop_process(proc: subprocess.Popen[bytes], grace: float, sig: int = signal.SIGTERM) -> None:
    """:func:`stop_processes` for one child."""
    stop_processes([proc], grace, sig)


def kill_processes(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGKILL every child still running, without waiting (the caller reaps them)."""
    for proc in procs:
        proc.kill()


__all__ = ["LoggedProcess", "free_port", "kill_processes", "start_process", "stop_process", "stop_processes"]
