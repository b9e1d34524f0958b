"""The jobs a worker holds, and the rule for which thread may touch them when.

Four threads meet over taken jobs: the taker (takes, decodes, tokenizes: :mod:`worker.taker`),
compute (runs batches: :mod:`worker.compute`), the completer (writes outcomes:
:mod:`worker.completer`) and the heartbeat (extends executions, in :mod:`worker.batch_worker`).
The rule, in full:

1. **The taker builds a slot alone.** It creates each :class:`Slot`, records it in
   :class:`Inflight`, and fills in its request, result list and counts before any of its items is
   published (added to the pool, or the slot handed to the completer). Until then no other thread
   reads those fields, so no lock is needed.
2. **Published items settle under one lock.** Once a slot's items are in the pool, its ``results``
   and ``remaining`` change only in :meth:`Inflight.settle`, under the registry's lock: compute
   settles forward results, the taker settles texts the tokenizer refused, and the two can settle
   items of one job at the same moment.
3. **A finished slot belongs to the completer.** The settle that brings ``remaining`` to zero
   returns the slot, and its caller hands it on through :class:`Finished` (the taker does the same
   for a job that fails as a whole or has no valid item). From then on only the completer reads or
   changes the slot; the queue orders the hand-off, so it sees everything written before.
4. **Which jobs are held is asked of :class:`Inflight` only**, and each of its methods takes its
   lock: the taker adds, the completer releases what it wrote, giving back releases what went back
   to the queue, the heartbeat and the taker's burst check read.

Two fields sit outside the rule because a single thread owns each: ``computing`` is compute's
(whether a job's wait was already measured) and ``written`` is the completer's (what a retried
completion skips). ``job``, ``queue`` and ``priority`` never change after the taker creates a slot,
so any thread may read them.
"""

from __future__ import annotations

import queue as queue_mod
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from rq import Queue

from queuebert.schema import INVALID_JOB, ItemResult, JobRequest

from .job_rows import Group, finish
from .job_store import TakenJob


@dataclass(eq=False)
class Slot:
    """One taken job: where its items' results go, and how many are still to come.

    Compared by identity: two slots are the same job only if they are the same object (one job
    can be held twice, under two executions).
    """

    job: TakenJob
    queue: Queue
    priority: int = 0  # index of its queue: 0 is the most urgent
    request: JobRequest | None = None
    #: The job's item results, then one per zero-shot pair (:mod:`worker.job_rows`), until the
    #: last row settles; then the item results alone.
    results: list[ItemResult | None] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # where each row's result goes
    remaining: int = 0  # rows not settled yet
    groups: list[Group] = field(default_factory=list)  # zero-shot items, assembled at the last settle
    error: str | None = None  # the job fails as a whole, with this reason
    error_kind: str = INVALID_JOB
    computing: bool = False  # compute's own: some item has been through a forward batch
    written: bool = False  # the completer's own: its outcome is in Redis


class Inflight:
    """The jobs this worker holds, keyed by ``<job id>:<execution id>``, and the lock under which
    their published items settle (see the module docstring).

    Keyed by execution, not job: the same job can be held twice (RQ requeued it after its
    execution expired while Redis refused heartbeats, and this worker took it again).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[str, Slot] = {}

    def hold(self, slots: Iterable[Slot]) -> None:
        with self._lock:
            for slot in slots:
                self._slots[slot.job.composite_key] = slot

    def release(self, slots: Iterable[Slot]) -> None:
        """No longer held: written to Redis, or given back to the queue."""
        with self._lock:
            for slot in slots:
                self._slots.pop(slot.job.composite_key, None)

    def busy(self) -> bool:
        with self._lock:
            return bool(self._slots)

    def held(self) -> list[Slot]:
        with self._lock:
            return list(self._slots.values())

    def jobs(self) -> list[TakenJob]:
        """The jobs whose executions the heartbeat keeps alive."""
        with self._lock:
            return [slot.job for slot in self._slots.values()]

    def settle(self, outcomes: Iterable[tuple[Slot, int, ItemResult]]) -> list[Slot]:
        """Record results, each as ``(slot, index among the slot's rows, result)``; returns the
        slots whose last row this settled, with their zero-shot answers assembled, for the caller
        to hand to the completer."""
        finished: list[Slot] = []
        with self._lock:
            for slot, index, result in outcomes:
                slot.results[slot.positions[index]] = result
                slot.remaining -= 1
                if slot.remaining == 0:
                    finished.append(slot)
        for slot in finished:  # this thread's alone now (rule 3)
            if slot.groups:
                assert slot.request is not None  # a slot with groups was split from its request
                # list(): a fresh list of the slot's element type (results or still None)
                slot.results = list(finish(slot.results, slot.groups, len(slot.request.items)))
        return finished


_END = object()


class Finished:
    """Slots whose outcome is ready to write, from the taker and compute to the completer.

    The completer writes everything that finished meanwhile in one script call, so it takes the
    queue's whole content at once rather than one list at a time.
    """

    def __init__(self) -> None:
        self._queue: queue_mod.Queue[list[Slot] | object] = queue_mod.Queue()

    def put(self, slots: list[Slot]) -> None:
        if slots:
            self._queue.put(slots)

    def close(self) -> None:
        """Nothing more comes: :meth:`next` returns None once what is queued is taken."""
        self._queue.put(_END)

    def next(self) -> list[Slot] | None:
        """Wait for finished slots and return them with all others queued meanwhile; None once
        closed and empty."""
        first = self._queue.get()
        if not isinstance(first, list):  # _END
            return None
        return first + self.more()

    def more(self) -> list[Slot]:
        """Whatever finished since, without waiting (an end marker stays queued for :meth:`next`)."""
        out: list[Slot] = []
        while True:
            try:
                more = self._queue.get_nowait()
            except queue_mod.Empty:
                return out
            if not isinstance(more, list):  # _END
                self._queue.put(_END)
                return out
            out += more
