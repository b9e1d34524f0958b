"""Small shared helpers for tests: run a BatchWorker in burst mode in this process, or start a
`queuebert worker` process whose JSON log goes to a file."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import redis

from queuebert.procs import LoggedProcess, start_process
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


def start_worker(url: str, model: Path, name: str, **env: str) -> LoggedProcess:
    """A `queuebert worker` process on CPU in float32 with a 1 s heartbeat (``env`` overrides any
    ``QUEUEBERT_*``); its JSON log is in ``proc.log_path``."""
    from conftest import PYTHON, REPO, subprocess_env

    settings = {"QUEUEBERT_MODEL": str(model), "QUEUEBERT_DTYPE": "float32", "QUEUEBERT_DEVICE": "cpu",
                "QUEUEBERT_HEARTBEAT_INTERVAL": "1", "OMP_NUM_THREADS": "1", **env}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return start_process([PYTHON, "-m", "queuebert.cli", "worker", "--name", name, "--log-format", "json"],
                         env=subprocess_env(url, **settings), cwd=REPO,
                         log_path=LOG_DIR / f"{name}-{time.time():.0f}.log")
