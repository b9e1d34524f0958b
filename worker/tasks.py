"""The RQ job function and its failure callback.

``classify`` is what a stock ``rq worker`` runs, one job at a time, with the model cached per
process. The batching worker never calls it: it reads the same job payload and runs many jobs'
items through one :class:`~worker.engine.Engine` pool, but the results are identical.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog

from queuebert.results import record_job
from queuebert.schema import INVALID_JOB, DeadlineExceeded, ItemResult, JobError, error_result, parse_job
from queuebert.settings import WorkerSettings

from .job_rows import finish, split_items

log = structlog.get_logger(__name__)

_engine_lock = threading.Lock()
_engine: Any = None


def get_engine(settings: WorkerSettings | None = None) -> Any:
    """The process's engine, loaded on first use from ``QUEUEBERT_*`` settings."""
    global _engine
    with _engine_lock:
        if _engine is None:
            from .engine import Engine
            from .model import load_model

            s = settings or WorkerSettings.from_env()
            loaded = load_model(s.model, revision=s.revision, device=s.device, dtype=s.dtype,
                                trust_remote_code=s.trust_remote_code)
            _engine = Engine(loaded, s.max_batch_size, s.max_batch_tokens)
            _engine.asynchronous = _engine.asynchronous and s.overlap
        return _engine


def deadline_message(deadline: float) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(deadline))
    return f"deadline exceeded: not started within its time-to-live (deadline {when})"


def classify(items: Any = None, run: str | None = None, deadline: float | None = None,
             **options: Any) -> list[ItemResult]:
    """Classify one job's items; bad items get error results, the others are unaffected.
    ``options``: the job's :class:`~queuebert.schema.JobOptions`, as RQ kwargs (an unknown one
    fails the job, as the batching worker fails it)."""
    from rq import get_current_job

    settings = WorkerSettings.from_env()
    request = parse_job((), {"items": items, **({"run": run} if run else {}),
                             **({"deadline": deadline} if deadline is not None else {}), **options},
                        settings.max_items_per_job)
    if request.deadline is not None and time.time() > request.deadline:
        # Failed, as the batching worker fails it: on_job_failed tells the run's subscribers.
        raise DeadlineExceeded(deadline_message(request.deadline))
    engine = get_engine()
    rows = split_items(request, settings.max_text_chars, engine.m.model.config.label2id)
    for pos, result in zip(rows.positions, engine.classify(rows.rows, rows.options)):
        rows.results[pos] = result
    final = finish(rows.results, rows.groups, len(request.items))
    job = get_current_job()
    if run and job is not None:
        with job.connection.pipeline(transaction=False) as pipe:
            record_job(job.connection, pipe, run, job.id, final)
            pipe.execute()
    return final


def job_error_results(kwargs: Any, message: str, kind: str = INVALID_JOB) -> tuple[str | None, list[ItemResult]]:
    """For a job that failed as a whole: its run and one error result per item it carried, so
    the run still completes and subscribers hear why."""
    if not isinstance(kwargs, dict):
        return None, []
    run = kwargs.get("run") if isinstance(kwargs.get("run"), str) else None
    items = kwargs.get("items")
    if not isinstance(items, list):
        items = []
    out = []
    for raw in items:
        item_id = raw.get("id", "") if isinstance(raw, dict) else ""
        out.append(error_result(item_id, kind, message))
    return run, out


def on_job_failed(job: Any, connection: Any, exc_type: Any = None, exc_value: Any = None, tb: Any = None) -> None:
    """RQ failure callback: once a job has no retries left, close its items in the run."""
    if job.retries_left:
        return  # RQ will run it again
    try:
        kwargs = job.kwargs
    except Exception:
        return  # not our payload: nothing to close
    if isinstance(exc_value, JobError):
        # Why queuebert refused the job, worded as the batching worker words it.
        message, kind = str(exc_value), exc_value.kind
    else:
        message, kind = f"job failed: {exc_type.__name__ if exc_type else 'error'}: {exc_value}", INVALID_JOB
    run, results = job_error_results(kwargs, message, kind)
    if run:
        with connection.pipeline(transaction=False) as pipe:
            record_job(connection, pipe, run, job.id, results)
            pipe.execute()
