"""Small shared helpers for tests: run a BatchWorker in burst mode in this process, or start a
`queuebert worker` process whose JSON log goes to a file."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from queuebert.procs import LoggedProcess, free_port, start_process, stop_processes
from queuebert.settings import WorkerSettings


def run_burst(conn: redis.Redis, engine: Any, queues: list[str] | None = None, **settings: Any) -> Any:
    from worker.batch_worker import BatchWorker

    s = WorkerSettings(queues=queues or ["default"], burst=True, **settings)
    worker = BatchWorker(s.queues, connection=conn, settings=s, engine=engine)
    worker.work(burst=True)
    return worker


def pipeline_reference(model_dir: str, texts: list[str], device: str = "cpu") -> list[dict[str, float]]:
    """transformers' own text-classification pipeline, float32, all labels."""
    from transformers import pipeline

    pipe = pipeline("text-classification", model=model_dir, top_k=None, device=device, dtype="float32")
    return [{d["label"]: d["score"] for d in row} for row in pipe(texts, truncation=True, batch_size=1)]


# Kept after the session, so a failed test's worker log can still be read.
LOG_DIR = Path(os.environ.get("QB_TEST_LOG_DIR", "/tmp/queuebert-test-logs"))


#: `queuebert worker` with every forward taking ``forward_s`` longer: a tiny model's forward made
#: as long as a real model's on a CPU, for tests of what clients do while a worker is busy.
_SLOWED_WORKER = """
import sys, time
from worker.engine import Engine
finish = Engine.finish
def slowed(self, *args, **kwargs):
    time.sleep({forward_s})
    return finish(self, *args, **kwargs)
Engine.finish = slowed
from queuebert_cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def start_worker(url: str, model: Path, name: str, forward_s: float = 0.0, **env: str) -> LoggedProcess:
    """A `queuebert worker` process on CPU in float32 with a 1 s heartbeat (``env`` overrides any
    ``QUEUEBERT_*``), each forward ``forward_s`` slower; its JSON log is in ``proc.log_path``."""
    from conftest import PYTHON, REPO, subprocess_env

    settings = {"QUEUEBERT_MODEL": str(model), "QUEUEBERT_DTYPE": "float32", "QUEUEBERT_DEVICE": "cpu",
                "QUEUEBERT_HEARTBEAT_INTERVAL": "1", "OMP_NUM_THREADS": "1", **env}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    program = ["-c", _SLOWED_WORKER.format(forward_s=forward_s)] if forward_s else ["-m", "queuebert_cli"]
    return start_process([PYTHON, *program, "worker", "--name", name, "--log-format", "json"],
                         env=subprocess_env(url, **settings), cwd=REPO,
                         log_path=LOG_DIR / f"{name}-{time.time():.0f}.log")


def start_gateway(url: str, queue: str, **flags: str) -> tuple[LoggedProcess, str]:
    """A `queuebert serve` process on a free port (``flags`` as its long options), once it answers;
    returns it and its base URL."""
    import httpx

    from conftest import PYTHON, REPO, subprocess_env

    port = free_port()
    cmd = [PYTHON, "-m", "queuebert_cli", "serve", "--redis-url", url, "--queue", queue, "--port", str(port),
           "--log-format", "json"]
    for flag, value in flags.items():
        cmd += [f"--{flag.replace('_', '-')}", value]
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    proc = start_process(cmd, env=subprocess_env(url), cwd=REPO, log_path=LOG_DIR / f"gateway-{queue}-{port}.log")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(base + "/metrics", headers=auth_headers(flags), timeout=1)
            return proc, base
        except httpx.TransportError:
            assert proc.poll() is None, proc.log_path.read_text() if proc.log_path else "gateway exited"
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.1)


def auth_headers(flags: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {flags['api_key']}"} if "api_key" in flags else {}


def reap(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill (not stop: the test is over) every process of ``procs`` still running, and empty it,
    so a failed assertion leaves no worker, gateway or frozen Redis behind."""
    running = [p for p in procs if p.poll() is None]
    procs.clear()
    stop_processes(running, 10, sig=signal.SIGKILL)
