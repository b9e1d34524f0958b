"""Which finished jobs the fast path completes, and completing the others with RQ's own handlers.

The fast path (:class:`worker.job_store.JobStore`, one Lua call per round of jobs) writes what
RQ's ``handle_job_success`` writes for a plain job. For jobs that use RQ features it does not
implement, RQ's handlers are called instead, so those jobs behave exactly as under RQ's own worker
(``tests/test_rq_parity.py`` compares both, key by key). The batching still computes every job;
only the bookkeeping of these is RQ's:

- **repeats** (``Repeat``): RQ schedules the next run;
- **rate limits** (``RateLimit``): RQ releases the job's slot and promotes a waiting job;
- **result TTL 0**: RQ deletes the job at once;
- **every job**, when the installed RQ's jobs have attributes the fast path does not know (a newer
  RQ's features: :func:`queuebert.upstream.unknown_job_attributes`);
- **dependents** (``depends_on``): RQ moves them to its ready registry in the same transaction as
  the completion, so a worker that dies in between leaves them where maintenance finds them. The
  dependents set can appear while a job runs, so ``complete.lua`` decides this one, atomically,
  and leaves such a job to :func:`complete`.

Failures always go through ``handle_job_failure``: RQ's retries, failure TTL, failed registry and
dependents' release.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.utils import now

from queuebert.results import encode_results, record_job
from queuebert.schema import INVALID_JOB, ItemResult, JobRequest, is_error
from queuebert.upstream import set_job_finished, unknown_job_attributes

from .job_rows import settled
from .tasks import job_error_results

if TYPE_CHECKING:
    from .job_store import JobStore, TakenJob

log = structlog.get_logger(__name__)

#: RQ features whose jobs complete through RQ's handlers: the job hash field that marks a job as
#: using one (``take.lua`` reads it; non-empty means used), and the fields that come with it.
RQ_FEATURES: dict[str, tuple[str, ...]] = {
    "repeats_left": ("repeat_intervals",),  # Repeat
    "rate_limit_key": ("rate_limit_concurrency",),  # RateLimit
}


@functools.cache
def fast_path_usable() -> bool:
    unknown = unknown_job_attributes()
    if unknown:
        log.warning("this RQ's jobs have attributes the fast path does not know: every job completes through "
                    "RQ's own handlers", attributes=sorted(unknown))
    return not unknown


class ComputedJob(Protocol):
    """A job the worker has computed (what this module reads of a :class:`worker.slots.Slot`)."""

    job: TakenJob
    queue: Queue
    request: JobRequest | None
    results: list[ItemResult | None]
    written: bool


def needs_rq(job: TakenJob, default_result_ttl: int) -> bool:
    """Whether ``job`` must complete through RQ's handlers rather than the fast path."""
    if job.rq_features or not fast_path_usable():
        return True
    return (job.result_ttl if job.result_ttl is not None else default_result_ttl) == 0


def complete(worker: Any, store: JobStore, finished: Sequence[ComputedJob]) -> None:
    """Write the success of every job in ``finished``: the fast path for the jobs it implements, in
    one script call, RQ's ``handle_job_success`` for the others. Marks each ``written`` once it
    is, so a caller retrying after a Redis error writes nothing twice."""
    from .job_store import Completion

    fast: list[Completion] = []
    by_id: dict[str, ComputedJob] = {}
    to_rq: list[ComputedJob] = []
    for f in finished:
        if needs_rq(f.job, worker.default_result_ttl):
            to_rq.append(f)
            continue
        results = settled(f.results)
        fast.append(Completion(f.job, encode_results(results), f.request.run if f.request else None,
                               len(results), sum(1 for r in results if is_error(r))))
        by_id[f.job.id] = f
    left = set(store.complete(fast, worker.default_result_ttl))
    for job_id, f in by_id.items():
        if job_id in left:
            to_rq.append(f)
        else:
            f.written = True
    for f in to_rq:
        complete_with_rq(worker, store, f)
        f.written = True


def complete_with_rq(worker: Any, store: JobStore, f: ComputedJob) -> None:
    """What RQ's worker does once ``job.perform()`` has returned ``f.results``: the run record
    (as ``worker.tasks.classify`` writes it), then ``handle_job_success``."""
    connection = worker.connection
    job = _fetch(worker, store, f.job)
    if job is None:
        return
    job.ended_at = now()
    results = settled(f.results)
    set_job_finished(job, results)
    run = f.request.run if f.request is not None else None
    with connection.pipeline(transaction=False) as pipe:
        if run:
            record_job(connection, pipe, run, job.id, results)
        pipe.hincrby(worker.key, "qb_items", len(f.results))
        pipe.execute()
    log.debug("completing with RQ's handlers", job=job.id, features=f.job.rq_features)
    worker.handle_job_success(job, f.queue, f.queue.started_job_registry, f.job.execution(connection, worker.name))


def fail(worker: Any, store: JobStore, f: ComputedJob, error: str, kind: str = INVALID_JOB) -> None:
    """A job that cannot run: RQ's ``handle_job_failure`` with ``error`` as its reason (retried while
    it has retries left, as RQ's worker retries a job whose function raised); once it is failed
    for good, its items reach the run as error results, as ``worker.tasks.on_job_failed`` writes
    them."""
    job = _fetch(worker, store, f.job)
    if job is None:
        return
    final = not job.should_retry
    job.ended_at = now()
    log.warning("job failed", job=job.id, error=error, **({} if final else {"retries_left": job.retries_left}))
    worker.handle_job_failure(job, f.queue, exc_string=error, execution=f.job.execution(worker.connection, worker.name))
    if not final:
        return
    try:
        kwargs = f.job.decode()[2]
    except Exception:
        return  # not our payload: no run to tell
    run, results = job_error_results(kwargs, error, kind)
    if run:
        with worker.connection.pipeline(transaction=False) as pipe:
            record_job(worker.connection, pipe, run, job.id, results)
            pipe.execute()


def _fetch(worker: Any, store: JobStore, taken: TakenJob) -> Any:
    """The RQ job, or None if its hash is gone (a reader consumed it after another worker
    finished it): then only this worker's execution is removed."""
    try:
        return worker.job_class.fetch(taken.id, connection=worker.connection, serializer=worker.serializer)
    except NoSuchJobError:
        with worker.connection.pipeline(transaction=False) as pipe:
            store.delete_executions([taken], pipe)
            pipe.execute()
        return None
