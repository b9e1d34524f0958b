"""How much work waits in each queue, in items (texts), and how long the oldest has waited.

What an autoscaler needs: RQ's queue length counts jobs, and a queuebert job carries 1 to 64 texts
(or more), so 10 queued jobs may be 10 texts or 640. Each job hash records its item count
(``keys.JOB_ITEM_COUNT``, written at enqueue by :mod:`producer.jobs`) and one read-only script
(``queuebert/lua/queue_depth.lua``) sums it over the ids in the queue's lists and its started
registry, at one instant. There is no counter kept in step with the queue: a job that RQ itself
puts back (a retry, a killed worker's job recovered from the started registry, ``rq requeue``) is
counted again simply because its id is back in the list.

No I/O happens at import; :func:`read_depths` is one round trip for any number of queues.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from rq import Queue
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.utils import utcparse

from . import keys, scripts
from .scripts import ArgLayout

#: Named arguments of queue_depth.lua (``ARGV[ARG.<name>]``).
QUEUE_DEPTH_ARGS = ArgLayout(("scan", "sample"))


@dataclass(frozen=True)
class QueueDepth:
    """One queue at one instant. ``*_estimated``: beyond the first ``scan`` jobs, the items were
    estimated from a sample (see queue_depth.lua), and the jobs beyond them are RQ's list length
    (which also counts an id whose job hash expired while queued, never counted below it)."""

    queue: str
    waiting_jobs: int
    waiting_items: int
    waiting_estimated: bool
    #: Unix time the oldest waiting job was enqueued (RQ's ``enqueued_at``), None when none waits.
    oldest_enqueued_at: float | None
    started_jobs: int
    started_items: int
    started_estimated: bool

    def oldest_age(self, now: float | None = None) -> float:
        """Seconds the oldest waiting item has waited (0 when none waits). Its ``enqueued_at`` comes
        from the producer's clock: skew between hosts shows up here."""
        if self.oldest_enqueued_at is None:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - self.oldest_enqueued_at)


@functools.cache
def _source() -> str:
    return scripts.load("queuebert", "queue_depth.lua", {
        "ARG": QUEUE_DEPTH_ARGS, "JOB_PREFIX": Job.redis_job_namespace_prefix,
        "ITEM_COUNT_FIELD": keys.JOB_ITEM_COUNT})


def queue_keys(queue: str) -> list[str]:
    """The keys queue_depth.lua reads for ``queue``: its list, RQ's intermediate list, its started registry."""
    key = Queue.redis_queue_namespace_prefix + queue
    return [key, IntermediateQueue.get_intermediate_queue_key(key), StartedJobRegistry.key_template.format(queue)]


def known_queues(conn: redis.Redis) -> list[str]:
    """Every queue RQ knows of (``rq:queues``: any queue a job was ever enqueued to), sorted."""
    prefix = Queue.redis_queue_namespace_prefix
    names = (m.decode() if isinstance(m, bytes) else str(m) for m in conn.smembers(Queue.redis_queues_keys))
    return sorted(n.removeprefix(prefix) for n in names if n.startswith(prefix))


def read_depths(conn: redis.Redis, queues: Sequence[str], *, scan: int = 1000, sample: int = 100) -> list[QueueDepth]:
    """The depth of each of ``queues``, one script call per queue, all in one round trip.

    ``scan`` jobs per queue are read one by one (about 2 us of Redis time each), the items of the
    rest estimated from ``sample`` of them: a scrape never blocks Redis for long, however deep the
    queue.
    """
    if scan < 1 or sample < 0:
        raise ValueError(f"scan must be at least 1 and sample at least 0 (got {scan}, {sample})")
    if not queues:
        return []
    script = conn.register_script(_source())
    with conn.pipeline(transaction=False) as pipe:
        for q in queues:
            script(keys=queue_keys(q), args=[scan, sample], client=pipe)
        replies = pipe.execute()
    return [_parse(q, r) for q, r in zip(queues, replies)]


def _parse(queue: str, reply: Sequence[Any]) -> QueueDepth:
    w_jobs, w_items, w_est, oldest, s_jobs, s_items, s_est = reply
    oldest_text = oldest.decode() if isinstance(oldest, bytes) else str(oldest or "")
    return QueueDepth(queue=queue, waiting_jobs=int(w_jobs), waiting_items=int(w_items),
                      waiting_estimated=bool(int(w_est)),
                      oldest_enqueued_at=utcparse(oldest_text).timestamp() if oldest_text else None,
                      started_jobs=int(s_jobs), started_items=int(s_items), started_estimated=bool(int(s_est)))
