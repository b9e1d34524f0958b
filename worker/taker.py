"""The taker: keeps the item pool filled while compute runs, and gives jobs back at a stop.

Each round takes many jobs in one script call, registered as started exactly as RQ registers them
(:class:`~worker.job_store.JobStore`), decodes and checks them, tokenizes their items and adds them
to the pool batches are cut from (:class:`~worker.scheduler.ItemPool`). Which thread may touch a
taken job when is :mod:`worker.slots`' rule.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Mapping

import redis
import structlog
from rq import Queue
from rq.exceptions import DeserializationError

from queuebert import keys
from queuebert.schema import DEADLINE_EXCEEDED, Item, JobError, parse_job
from queuebert.settings import WorkerSettings

from .engine import Engine
from .job_rows import RowOptions, split_items
from .job_store import JobStore
from .outage import Outage
from .scheduler import Entry, ItemPool
from .slots import Finished, Inflight, Slot
from .tasks import deadline_message

log = structlog.get_logger(__name__)


class Taker:
    """Takes jobs into the pool (:meth:`run`, in its own thread) and gives back what a stopping
    worker will not finish (:meth:`return_unstarted`, :meth:`give_back`)."""

    #: Texts per tokenizer call: large enough to amortise the call, small enough that a burst
    #: reaches the pool in steps of a few milliseconds.
    TOKENIZE_CHUNK = 256

    def __init__(self, *, connection: redis.Redis, store: JobStore, queues: list[Queue], engine: Engine,
                 pool: ItemPool, settings: WorkerSettings, inflight: Inflight, finished: Finished,
                 outages: Mapping[str, Outage], execution_ttl: int, stop: threading.Event):
        self.connection = connection
        self.store = store
        self.queues = queues  # in priority order, as the store numbers them
        self.engine = engine
        self.pool = pool
        self.settings = settings
        self.inflight = inflight
        self.finished = finished
        self.outages = outages
        self.execution_ttl = execution_ttl
        self._stop = stop
        self.label2id = engine.m.model.config.label2id  # for zero-shot items (worker.job_rows)
        #: Set when the taker has stopped taking (stopped, or a burst found the queues empty).
        self.done = threading.Event()

    def run(self, burst: bool) -> None:
        """Keep the pool filled up to its capacity (``max_pool_items``) while compute runs. With
        nothing queued, block on the queue (Redis wakes us when a job arrives); with the pool full, back off so the
        poll does not steal the cores the forward needs."""
        s = self.settings
        pool = self.pool
        pause = 0.0005
        items_per_job = 1.0  # running estimate, to ask for about as many jobs as the pool has room for
        sized = False
        try:
            while not self._stop.is_set():
                room = pool.capacity - len(pool)
                if room <= 0:
                    time.sleep(pause)
                    pause = min(pause * 2, 0.02)
                    continue
                # Until the first jobs show how many items a job holds, take one: 256 jobs of
                # 64 texts would overshoot the pool sixteenfold.
                want = max(1, min(s.take_jobs, math.ceil(room / items_per_job))) if sized else 1
                block = 0.0 if burst else (1.0 if len(self.queues) == 1 else 0.05)
                if self.outages["complete"].down:
                    # Results cannot be written: taking more would only pile up work that cannot
                    # finish. What the worker holds stays bounded by its pool.
                    self._stop.wait(0.1)
                    continue
                # Looked at before the take: a job still held may be queued again as it completes
                # (a retry, a repeat, a released dependent), so a burst ends only after a take that
                # began with nothing held found nothing.
                held = self.inflight.busy()
                try:
                    slots = self.take(want, block)
                    self.outages["take"].recovered()
                except redis.RedisError as exc:
                    self._stop.wait(self.outages["take"].failed(exc))
                    continue
                if not slots:
                    pool.expect(0, queued=False)  # nothing queued (another worker may have taken it)
                    if burst and not held:
                        return
                    time.sleep(pause if burst or len(self.queues) > 1 else 0)
                    pause = min(pause * 2, 0.02)
                    continue
                pause = 0.0005
                self.prepare(slots)
                taken = sum(len(sl.positions) for sl in slots) / len(slots)
                if taken:
                    items_per_job = taken if not sized else max(1.0, 0.8 * items_per_job + 0.2 * taken)
                    sized = True
        finally:
            self.done.set()
            # Wakes compute at once rather than at its next poll (up to half a second per poll at
            # the end of a burst). Nothing is left to batch: a stopped worker drains the pool, and a
            # burst ends only once nothing is held, so none of its items is still in the pool.
            pool.close()

    def take(self, want: int, block: float) -> list[Slot]:
        """Up to ``want`` jobs, registered as started and held; with none queued, wait up to
        ``block`` seconds on the most urgent queue (only one list can be waited on: with several
        queues the caller blocks briefly and comes back to look at the others)."""
        taken, gone = self.store.take(want, self.execution_ttl)
        if not taken and not gone and block:
            first = self.queues[0]
            # Into RQ's intermediate list, so a worker killed right here leaves the job where
            # RQ's maintenance finds it; the take script moves it on from there. (redis-py types
            # BLMOVE's timeout as an int, though Redis 6+ takes a float, and its reply as str | bytes
            # whatever the client's decode_responses: this connection's replies are bytes.)
            job_id = self.connection.blmove(first.key, first.intermediate_queue_key,
                                            block, "LEFT", "RIGHT")  # type: ignore[arg-type]
            if job_id is None:
                return []
            taken, gone = self.store.take(want, self.execution_ttl, first=(0, job_id.decode()))  # type: ignore[union-attr]
        slots = [Slot(job=tj, queue=self.queues[tj.queue_index], priority=tj.queue_index) for tj in taken]
        self.inflight.hold(slots)
        return slots

    def prepare(self, slots: list[Slot]) -> None:
        """Decode and check each job, tokenize all their items, add them to the pool. A job that
        cannot run, or whose items all failed before the forward, goes to the completer at once."""
        s = self.settings
        new_items: list[Item] = []
        new_options: list[RowOptions] = []
        owners: list[tuple[Slot, int]] = []
        ready: list[Slot] = []
        for slot in slots:
            slot.error = self._read(slot)
            if slot.error is not None:
                ready.append(slot)
                continue
            assert slot.request is not None
            rows = split_items(slot.request, s.max_text_chars, self.label2id)
            slot.results, slot.positions, slot.remaining = rows.results, rows.positions, len(rows.rows)
            slot.groups = rows.groups
            new_items.extend(rows.rows)
            new_options.extend(rows.options)
            owners.extend(zip(itertools.repeat(slot, len(rows.rows)), range(len(rows.rows))))
            if not rows.rows:
                ready.append(slot)
        self.finished.put(ready)
        # Tokenize and add in chunks, so a burst fills the pool progressively and compute can
        # start on a few hundred texts instead of waiting for all of them (or starting on a few).
        self.pool.expect(len(new_items), queued=self.store.left > 0)
        for start in range(0, len(new_items), self.TOKENIZE_CHUNK):
            end = min(start + self.TOKENIZE_CHUNK, len(new_items))
            enc, errors = self.engine.encode(new_items[start:end], new_options[start:end])
            failed = dict(errors)
            entries = [Entry(owners[i][0], owners[i][1], new_items[i], new_options[i], enc.ids[i - start],
                             owners[i][0].priority) for i in range(start, end) if i - start not in failed]
            if failed:
                # The tokenizer refused these texts: the error is their result. Earlier chunks
                # of the same jobs may be in a forward batch right now, hence settle.
                self.finished.put(self.inflight.settle(
                    (*owners[start + i], err) for i, err in failed.items()))
            self.pool.add(entries, settled=end - start)

    def _read(self, slot: Slot) -> str | None:
        """Decode and check one job, setting ``slot.request``; the reason it cannot run, if any."""
        try:
            func_name, args, kwargs = slot.job.decode()
            if func_name != keys.JOB_FUNC:
                raise JobError(f"BatchWorker runs only {keys.JOB_FUNC}, not {func_name}")
            slot.request = parse_job(args, kwargs, self.settings.max_items_per_job)
            if slot.request.deadline is not None and time.time() > slot.request.deadline:
                slot.error_kind = DEADLINE_EXCEEDED
                return deadline_message(slot.request.deadline)
        except DeserializationError:
            return "job payload is not JSON (a pickled job?); refused without executing it"
        except JobError as exc:
            return str(exc)
        except Exception as exc:
            return f"unreadable job: {type(exc).__name__}: {exc}"
        return None

    # -- giving back ----------------------------------------------------------------------------

    def return_unstarted(self) -> None:
        """At a stop, after compute has ended: jobs with items still in the pool go back to the
        front of their queue, as if never taken (results of a partly computed job are dropped:
        whoever takes it next computes them all). An item still in the pool is unsettled, so its
        job never reached the completer."""
        owners = dict.fromkeys(e.owner for e in self.pool.drain())
        self.give_back(list(owners), "not started")

    def give_back(self, slots: list[Slot], what: str) -> None:
        """Return jobs to the front of their queues and stop holding them. If Redis refuses, they
        stay in the started registry, where RQ's maintenance (any worker's) requeues them once
        their executions expire, within about three heartbeat intervals."""
        if not slots:
            return
        try:
            given = self.store.give_back([slot.job for slot in slots])
        except redis.RedisError as exc:
            log.warning(f"could not give back jobs {what}; they are recovered when their executions expire",
                        jobs=len(slots), error=str(exc))
            return
        self.inflight.release(slots)
        log.info(f"gave back jobs {what}", jobs=given, **({"no_longer_held": len(slots) - given}
                                                          if given < len(slots) else {}))
