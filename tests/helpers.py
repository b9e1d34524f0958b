"""Small shared helpers for tests: run a BatchWorker in burst mode in this process."""

from __future__ import annotations

from typing import Any

import redis

from producer.settings import WorkerSettings


def run_burst(conn: redis.Redis, engine: Any, queues: list[str] | None = None, **settings: Any) -> Any:
    from worker.batch_worker import BatchWorker

    s = WorkerSettings(queues=queues or ["default"], burst=True, **settings)
    worker = BatchWorker(s.queues, connection=conn, settings=s, engine=engine)
    worker.work(burst=True)
    return worker


def pipeline_reference(model_dir: str, texts: list[str]) -> list[dict[str, float]]:
    """transformers' own text-classification pipeline, float32, all labels."""
    from transformers import pipeline

    pipe = pipeline("text-classification", model=model_dir, top_k=None, device="cpu", dtype="float32")
    return [{d["label"]: d["score"] for d in row} for row in pipe(texts, truncation=True, batch_size=1)]
