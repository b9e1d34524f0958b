"""When ``AsyncClient`` sends the submits it gathers: the coalescing policy, without I/O or timers.

The policy is told what happens (an item was submitted to a batch, results arrived, a send saw
the queue's state) and answers what to do with a batch: :data:`SEND` it now, or hold it until a
deadline (:class:`HoldUntil`, on the injected clock). ``AsyncClient`` keeps the batches, the
futures and the timers (``producer.async_client._Coalescer``); the rules are here, so scripted
arrival patterns test them without Redis or sleeps (``tests/test_coalescing.py``).

How long a batch gathers depends on whether a job sent now would start at once:

- **Something would take it** (fewer awaited jobs in flight than workers serve the queue, and the
  queue held no unstarted job at the last send): ``coalesce_ms``, enough to catch a burst.
- **It would wait anyway** (every worker already has one of the jobs this client awaits, or the
  queue has a backlog): the batch is held, as TCP's Nagle holds small segments while data is
  unacknowledged, until an awaited result arrives and leaves a worker free, or
  ``coalesce_max_ms`` passes. The requests that arrive during one job then travel as the next
  job instead of as many one-text jobs.
- **Closed-loop traffic** (each submitter sends again when its answer comes back, as HTTP clients
  at a fixed concurrency do; see :class:`LoopDetector`). Over HTTP the answered come back one by
  one over several milliseconds (each woken request writes its answer, each client reads it and
  sends again). Sent as they came, the first would go alone while the rest were held behind it,
  and the load would settle into two half-size jobs alternating, each cut into its own smaller
  forwards. So, after results for ``k`` items arrive, a batch (and one held until then) gathers
  until ``k`` submits have come since, or ``coalesce_max_ms`` has passed; and while every worker
  has one of this client's jobs, a batch is held until one of their results arrives (at most
  ``coalesce_hold_ms``, a bound for a job whose worker died), since its submitters are about to
  come back. Open-loop traffic gets neither: there a job sent while the worker computes joins its
  pool at once and is in its next forward, and nobody is about to come back.

``chunk_size`` items send a batch at once whatever the window.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Send:
    """Send the batch now."""


#: The one :class:`Send` decision.
SEND = Send()


@dataclass(frozen=True, slots=True)
class HoldUntil:
    """Hold the batch until ``deadline`` (clock time), then send it; a later decision may send it
    sooner or move the deadline."""

    deadline: float


#: What the policy says of one batch; None: nothing changes (its timer stands).
Decision = Send | HoldUntil | None


class LoopDetector:
    """Tells closed-loop traffic (each submitter waits for its answer before sending again) from
    open-loop traffic: closed-loop submits crowd into the windows just after results, open-loop
    ones arrive at the same rate inside and outside them. The evidence (submits and seconds inside
    and outside the windows) is an exponential average over results events. Where windows cover
    most of the time (results come faster than the window) the two cannot be told apart, and
    nothing is assumed."""

    #: Closed loop: submits arrive this many times as fast in the windows after results as at
    #: other times (open-loop traffic: as fast, whatever the results do).
    LOOP_RATIO = 4.0
    #: Fewest submits (decayed) just after results before the traffic is judged closed-loop.
    LOOP_MIN_SUBMITS = 4.0
    #: Share of the evidence kept at each results event.
    LOOP_DECAY = 0.9

    def __init__(self) -> None:
        self.closed = False
        self._in_n = self._in_s = self._out_n = self._out_s = 0.0
        self._mark: float | None = None

    def submitted(self, in_window: bool) -> None:
        if in_window:
            self._in_n += 1
        else:
            self._out_n += 1

    def judge(self, now: float, window_end: float) -> bool:
        """At a results event at ``now``, the window after the previous one having ended (or
        ending) at ``window_end``: whether the traffic is closed-loop."""
        if self._mark is not None:
            inside = max(0.0, min(now, window_end) - self._mark)
            self._in_s += inside
            self._out_s += max(0.0, now - self._mark - inside)
        self._mark = now
        # The +1: an outside with no submit yet is evidence of one, not of none.
        self.closed = (self._in_n >= self.LOOP_MIN_SUBMITS and self._out_s >= self._in_s > 0
                       and self._in_n / self._in_s >= self.LOOP_RATIO * (self._out_n + 1) / self._out_s)
        self._in_n *= self.LOOP_DECAY
        self._in_s *= self.LOOP_DECAY
        self._out_n *= self.LOOP_DECAY
        self._out_s *= self.LOOP_DECAY
        return self.closed


class CoalescingPolicy:
    """The rules above, for batches named by any hashable key (``AsyncClient``: the queue and
    the job options), each on one queue.

    Inputs: :meth:`submitted`, :meth:`results_arrived` (with ``awaited``, how many of this
    client's jobs it awaits results of now), :meth:`observed` (a send's view of its queue),
    :meth:`forget` (a batch was sent or emptied). Outputs: a :data:`Decision` per batch. Times are
    ``clock()`` readings, in seconds.
    """

    def __init__(self, *, coalesce_ms: float, coalesce_max_ms: float, coalesce_hold_ms: float, chunk_size: int,
                 clock: Callable[[], float]):
        self.window = coalesce_ms / 1000
        self.max_window = coalesce_max_ms / 1000
        self.hold = coalesce_hold_ms / 1000
        #: Whether a batch that would wait is held longer than the window at all.
        self.holds = coalesce_max_ms > coalesce_ms
        self.chunk_size = chunk_size
        self.clock = clock
        #: Batches gathering with the long window (and their queues), sent early when a result arrives.
        self.held: dict[Hashable, str] = {}
        #: Batches gathering for the submitters of results that just arrived (closed loop).
        self.regathering: set[Hashable] = set()
        #: Items whose results arrived before ``regather_until``, and the submits made since the
        #: first of them.
        self.returning = self.returned = 0
        self.regather_until = 0.0
        self.loop = LoopDetector()
        #: Per queue, seen in the last send's round trip: unstarted jobs it held right after (0: a
        #: worker was waiting), and the workers RQ lists as serving it.
        self.backlog: dict[str, int] = {}
        self.workers: dict[str, int] = {}

    @classmethod
    def from_settings(cls, settings: Any, clock: Callable[[], float]) -> CoalescingPolicy:
        """From a :class:`~queuebert.settings.ClientSettings`."""
        return cls(coalesce_ms=settings.coalesce_ms, coalesce_max_ms=settings.coalesce_max_ms,
                   coalesce_hold_ms=settings.coalesce_hold_ms, chunk_size=settings.chunk_size, clock=clock)

    @property
    def closed_loop(self) -> bool:
        """Whether the traffic was judged closed-loop at the last results event."""
        return self.loop.closed

    def would_wait(self, queue: str, awaited: int) -> bool:
        """Whether a job sent to ``queue`` now would wait behind work already there."""
        return self.backlog.get(queue, 0) > 0 or self.all_busy(queue, awaited)

    def all_busy(self, queue: str, awaited: int) -> bool:
        """Whether every worker of ``queue`` has one of the ``awaited`` jobs."""
        return awaited >= max(1, self.workers.get(queue, 1))

    # -- inputs -----------------------------------------------------------------------------------

    def submitted(self, key: Hashable, queue: str, size: int, awaited: int) -> Decision:
        """An item joined batch ``key`` (now ``size`` items) for ``queue``."""
        now = self.clock()
        in_window = now < self.regather_until  # of results that just arrived
        if in_window:
            self.returned += 1
        self.loop.submitted(in_window)
        if size >= self.chunk_size:
            return SEND
        if key in self.regathering:
            return self._regather(key, now)
        if size == 1:
            if self.holds and self.would_wait(queue, awaited):
                self.held[key] = queue
                # Closed loop: held until one of our jobs ends, then sent with its submitters.
                hold = self.hold if self.loop.closed and self.all_busy(queue, awaited) else self.max_window
                return HoldUntil(now + hold)
            if in_window and self.loop.closed and self.returned < self.returning:
                return self._regather(key, now)
            return HoldUntil(now + self.window)
        return None

    def results_arrived(self, items: int, awaited: int) -> dict[Hashable, Decision]:
        """Results for ``items`` awaited items arrived (their submitters are about to hear), and
        ``awaited`` jobs are still awaited: what was held for a busy worker goes now (closed loop:
        with those submitters' next submits), unless every worker still has one of this client's
        jobs (a job sent now would still wait). Returns the batches whose decision changed."""
        now = self.clock()
        self.loop.judge(now, self.regather_until)
        if now >= self.regather_until:
            self.returning = self.returned = 0
        self.returning += items
        self.regather_until = now + self.max_window
        decisions: dict[Hashable, Decision] = {}
        for key, queue in list(self.held.items()):
            if not self.all_busy(queue, awaited):
                if self.loop.closed:
                    del self.held[key]
                    decision = self._regather(key, now)
                    if decision is not None:
                        decisions[key] = decision
                else:
                    decisions[key] = SEND
        return decisions

    def observed(self, queue: str, backlog: int, workers: int) -> None:
        """A send to ``queue`` found ``backlog`` unstarted jobs there right after it, and RQ lists
        ``workers`` workers serving it."""
        self.backlog[queue] = backlog
        self.workers[queue] = workers

    def forget(self, key: Hashable) -> None:
        """Batch ``key`` was sent (or its last item withdrawn): a new one starts afresh."""
        self.held.pop(key, None)
        self.regathering.discard(key)

    def _regather(self, key: Hashable, now: float) -> Decision:
        """Send ``key``'s batch once every returning submitter is back, else at ``regather_until``."""
        if self.returned >= self.returning or now >= self.regather_until:
            return SEND
        if key not in self.regathering:
            self.regathering.add(key)
            return HoldUntil(self.regather_until)
        return None
