"""Every Redis key queuebert owns, in one place.

RQ's own keys (queues, job hashes, registries, ``rq:results:<job>``) are left to RQ so that its tools
keep working; these are the keys queuebert adds beside them. A run's keys share the hash tag
``{run_id}`` so the completion script, which touches several of them atomically, also works on
Redis Cluster.
"""

from __future__ import annotations

PREFIX = "qb"

#: RQ function path of the classification job. It lives in the worker package so a stock
#: ``rq worker`` can import and run it; the producer only ever names it.
JOB_FUNC = "worker.tasks.classify"

#: RQ failure callback of every job, named by path for the same reason. With ``JOB_FUNC`` it is the
#: only thing a job hash may name for a worker to import (see ``queuebert.job.QueuebertJob``).
ON_FAILURE = "worker.tasks.on_job_failed"


#: Fields queuebert adds to each RQ worker hash (``rq:worker:<name>``), beside RQ's: what the
#: worker serves (model, device, dtype, labels as a JSON list, truncation length, scoring rule),
#: for `queuebert stats` and the HTTP gateway's ``/info``.
WORKER_MODEL_FIELDS = ("qb_model", "qb_device", "qb_dtype", "qb_labels", "qb_max_length", "qb_scoring")

#: Field queuebert adds to each RQ job hash (``rq:job:<id>``) it enqueues: how many items the job
#: carries. RQ's queue list counts jobs, which hold 1 to 64 texts each (more for a coalesced or
#: chunked run), so waiting work in items is the sum of this field over the queued job ids
#: (``queuebert/lua/queue_depth.lua``). It is written in the same HSET as RQ's own fields and never
#: changes, so a job requeued by RQ (a retry, a killed worker's recovery) carries it back with it.
JOB_ITEM_COUNT = "qb_item_count"

#: Sorted set of run ids by creation time, for `queuebert stats`.
RUNS = f"{PREFIX}:runs"


def run_meta(run_id: str) -> str:
    """Hash: ``enqueued``/``total`` items, ``jobs``, ``done``, ``errors``, ``sealed``, timestamps, and
    ``ttl``: the seconds the run's keys live after each completion (the producer's result TTL)."""
    return f"{PREFIX}:run:{{{run_id}}}"


def run_stream(run_id: str) -> str:
    """Stream: one entry per completed job (``job``, ``results`` as JSON). Subscribers XREAD it."""
    return f"{PREFIX}:run:{{{run_id}}}:stream"


def run_jobs(run_id: str) -> str:
    """List: the run's job ids in input order, for collecting results in order."""
    return f"{PREFIX}:run:{{{run_id}}}:jobs"


def run_done_jobs(run_id: str) -> str:
    """Set: job ids already counted as done, so a redelivered job is never counted twice."""
    return f"{PREFIX}:run:{{{run_id}}}:done"


def run_cursor(run_id: str) -> str:
    """String: how many of the run's jobs the producer has listed so far. Only the producer touches
    it (workers EXPIRE the other run keys all the time, which would break a WATCH on them): each
    enqueue round WATCHes it, so a round is applied once, and a resumed enqueue starts from it."""
    return f"{PREFIX}:run:{{{run_id}}}:cursor"


def run_keys(run_id: str) -> list[str]:
    """The keys of one run, in the order the completion script expects them."""
    return [run_meta(run_id), run_done_jobs(run_id), run_stream(run_id), run_jobs(run_id)]


def recovery_lock(queue: str) -> str:
    """String with a short expiry: one worker at a time sweeps a queue's abandoned jobs."""
    return f"{PREFIX}:recovery-lock:{queue}"
