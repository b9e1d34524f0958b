"""The coalescing policy on scripted arrival patterns: no Redis, no sleeps, no event loop.

``CoalescingPolicy`` is told what happens (submits, results, what a send saw of its queue) on an
injected clock and answers send now / hold until. :class:`Sim` plays the rest of the world on that
clock, as ``AsyncClient._Coalescer`` and a worker would: a batch is sent when the policy says so or
when its deadline passes, a worker takes one job at a time and answers after ``forward_s``. The
end-to-end tests in ``test_async_client.py`` keep one scenario per rule against a real Redis and a
real worker.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest

from producer.coalescing import SEND, CoalescingPolicy, HoldUntil, LoopDetector

KEY, QUEUE = ("q", "options"), "q"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def policy(clock: Clock, **overrides: Any) -> CoalescingPolicy:
    settings: dict[str, Any] = {"coalesce_ms": 2, "coalesce_max_ms": 20, "coalesce_hold_ms": 1000, "chunk_size": 64}
    settings.update(overrides)
    return CoalescingPolicy(clock=clock, **settings)


# -- one decision at a time -----------------------------------------------------------------------

def test_a_first_submit_gathers_for_the_short_window_while_a_worker_is_free():
    clock = Clock()
    p = policy(clock)
    p.observed(QUEUE, backlog=0, workers=2)
    clock.now = 5.0
    decision = p.submitted(KEY, QUEUE, 1, awaited=1)  # one of two workers busy
    assert isinstance(decision, HoldUntil) and decision.deadline == pytest.approx(5.002)
    assert p.submitted(KEY, QUEUE, 2, awaited=1) is None  # its timer stands
    assert p.held == {}


def test_a_full_batch_goes_at_once():
    p = policy(Clock(), chunk_size=3)
    assert isinstance(p.submitted(KEY, QUEUE, 1, awaited=0), HoldUntil)
    assert p.submitted(KEY, QUEUE, 2, awaited=0) is None
    assert p.submitted(KEY, QUEUE, 3, awaited=0) is SEND


def test_a_backlog_holds_the_batch_for_the_long_window_until_a_result_arrives():
    clock = Clock()
    p = policy(clock)
    p.observed(QUEUE, backlog=3, workers=4)  # the last send left jobs unstarted
    assert p.submitted(KEY, QUEUE, 1, awaited=0) == HoldUntil(0.020)
    clock.now = 0.005
    assert p.results_arrived(1, awaited=0) == {KEY: SEND}  # open loop: sent as a worker frees


def test_every_worker_busy_holds_until_one_of_their_results_frees_one():
    clock = Clock()
    p = policy(clock)
    p.observed(QUEUE, backlog=0, workers=2)
    assert p.submitted(KEY, QUEUE, 1, awaited=2) == HoldUntil(0.020)
    clock.now = 0.004
    assert p.results_arrived(1, awaited=2) == {}  # another job of ours took its place: still busy
    clock.now = 0.008
    assert p.results_arrived(1, awaited=1) == {KEY: SEND}


def test_nothing_is_held_when_the_long_window_is_no_longer_than_the_short_one():
    p = policy(Clock(), coalesce_max_ms=2)
    p.observed(QUEUE, backlog=5, workers=1)
    assert p.submitted(KEY, QUEUE, 1, awaited=1) == HoldUntil(0.002)
    assert p.held == {}


def test_a_forgotten_batch_is_not_sent_by_a_later_result():
    p = policy(Clock())
    p.observed(QUEUE, backlog=1, workers=1)
    assert isinstance(p.submitted(KEY, QUEUE, 1, awaited=0), HoldUntil)
    p.forget(KEY)  # sent by its timer, or its only submitter went away
    assert p.results_arrived(1, awaited=0) == {}


# -- telling closed-loop from open-loop traffic ---------------------------------------------------

def test_submits_crowding_after_results_are_judged_closed_loop():
    loop = LoopDetector()
    window = 0.1
    judged = []
    for cycle in range(6):  # results every 300 ms, each answered submitter back within 30 ms
        t = cycle * 0.3
        judged.append(loop.judge(t, window_end=t - 0.3 + window if cycle else 0.0))
        for _ in range(4):
            loop.submitted(in_window=True)
    assert judged[0] is False and judged[-1] is True


def test_submits_at_the_same_rate_inside_and_outside_the_windows_are_open_loop():
    loop = LoopDetector()
    for cycle in range(20):  # results every 600 ms; a submit every 25 ms, whatever the results do
        t = cycle * 0.6
        assert loop.judge(t, window_end=t - 0.6 + 0.1 if cycle else 0.0) is False
        for _ in range(4):
            loop.submitted(in_window=True)
        for _ in range(20):
            loop.submitted(in_window=False)


# -- arrival patterns through time ----------------------------------------------------------------

class Sim:
    """The world around the policy on a fake clock: the client's batch and its timer, one queue
    with ``workers`` workers taking one job at a time for ``forward_s`` each, and submitters."""

    def __init__(self, *, forward_s: float, workers: int = 1, **settings: Any):
        self.clock = Clock()
        self.policy = policy(self.clock, **settings)
        self.forward_s = forward_s
        self.workers = workers
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.pending: list[tuple[float, Any]] = []  # (submitted at, submitter)
        self._timer = 0  # the current timer's token: a moved deadline leaves the old one stale
        self.queued: deque[list[Any]] = deque()
        self.running = 0
        #: Every job sent: (sent at, its submitters); how long each item waited to be sent; the
        #: policy's judgement at each results event.
        self.sent: list[tuple[float, list[Any]]] = []
        self.waits: list[float] = []
        self.judged: list[bool] = []
        self.decisions: list[Any] = []
        self.on_answer: Callable[[Any], None] | None = None

    @property
    def awaited(self) -> int:
        return len(self.queued) + self.running

    def at(self, t: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), action))

    def run(self, until: float = 1e9) -> None:
        while self._events and self._events[0][0] <= until:
            t, _, action = heapq.heappop(self._events)
            self.clock.now = t
            action()

    def submit(self, who: Any) -> None:
        self.pending.append((self.clock.now, who))
        self._apply(self.policy.submitted(KEY, QUEUE, len(self.pending), self.awaited))

    def _apply(self, decision: Any) -> None:
        self.decisions.append(decision)
        if decision is SEND:
            self._send()
        elif isinstance(decision, HoldUntil):
            self._timer += 1
            token = self._timer
            self.at(decision.deadline, lambda: self._send() if token == self._timer else None)

    def _send(self) -> None:
        self.policy.forget(KEY)
        self._timer += 1
        batch, self.pending = self.pending, []
        if not batch:
            return
        self.waits.extend(self.clock.now - t for t, _ in batch)
        self.sent.append((self.clock.now, [who for _, who in batch]))
        self.queued.append([who for _, who in batch])
        self._dispatch()
        self.policy.observed(QUEUE, backlog=len(self.queued), workers=self.workers)

    def _dispatch(self) -> None:
        while self.queued and self.running < self.workers:
            job = self.queued.popleft()
            self.running += 1
            self.at(self.clock.now + self.forward_s, lambda job=job: self._complete(job))

    def _complete(self, job: list[Any]) -> None:
        self.running -= 1
        self._dispatch()
        for key, decision in self.policy.results_arrived(len(job), self.awaited).items():
            assert key == KEY
            self._apply(decision)
        self.judged.append(self.policy.closed_loop)
        if self.on_answer is not None:
            for who in job:
                self.on_answer(who)


def test_closed_loop_submitters_come_back_together_as_one_job():
    """Four users, each sending again 0, 10, 20 and 30 ms after its answer (as answers reach HTTP
    clients one by one), a worker taking 300 ms a job. Before the traffic is judged closed-loop,
    the first back goes alone and the rest are held behind it (1, 3, 1, 3...); once it is, the
    answered travel together again."""
    sim = Sim(forward_s=0.3, coalesce_max_ms=100)
    rounds = {i: 0 for i in range(4)}

    def answered(user: int) -> None:
        rounds[user] += 1
        if rounds[user] < 10:
            sim.at(sim.clock.now + 0.01 * user, lambda: sim.submit(user))

    sim.on_answer = answered
    for user in range(4):
        sim.at(0.0, lambda user=user: sim.submit(user))
    sim.run()
    sizes = [len(job) for _, job in sim.sent]
    assert sizes[0] == 4
    assert 1 in sizes[:4]  # split before the traffic was judged
    assert True in sim.judged
    assert sizes[-4:-1] == [4, 4, 4], sizes
    assert sum(sizes) == 40


def test_closed_loop_holds_a_batch_behind_a_busy_worker_until_its_results():
    """Judged closed-loop, a submit while every worker has one of this client's jobs is held for
    ``coalesce_hold_ms`` (its submitters are about to come back), not ``coalesce_max_ms``; after
    results for ``k`` items, a batch gathers until ``k`` submits have come."""
    sim = Sim(forward_s=0.3, coalesce_max_ms=100)
    rounds = {i: 0 for i in range(4)}

    def answered(user: int) -> None:
        rounds[user] += 1
        sim.at(sim.clock.now + 0.01 * user, lambda: sim.submit(user))

    sim.on_answer = answered
    for user in range(4):
        sim.at(0.0, lambda user=user: sim.submit(user))
    sim.run(until=5.0)
    assert sim.policy.closed_loop
    p = sim.policy
    sim.clock.now += 1.0  # past every window of the results so far
    # A newcomer while the worker has a job of ours: held for coalesce_hold_ms.
    other = ("q", "other options")
    assert p.submitted(other, QUEUE, 1, awaited=1) == HoldUntil(sim.clock.now + 1.0)
    p.forget(other)
    # Results for 3 items, a worker free: the first 2 of their submitters wait for the third,
    # which sends the batch.
    p.observed(QUEUE, backlog=0, workers=1)
    p.results_arrived(3, awaited=0)
    assert p.closed_loop
    third = ("q", "third options")
    assert p.submitted(third, QUEUE, 1, awaited=0) == HoldUntil(p.regather_until)
    assert p.submitted(third, QUEUE, 2, awaited=0) is None
    assert p.submitted(third, QUEUE, 3, awaited=0) is SEND


@pytest.mark.parametrize("workers", [1, 2])
def test_open_loop_submits_are_never_held_past_the_long_window(workers):
    """A request every 25 ms whatever the answers do, a worker taking 600 ms a job: the traffic
    is never judged closed-loop, and no item waits longer than coalesce_max_ms to be sent
    (judged closed-loop, it would wait for the answers of the job in flight)."""
    sim = Sim(forward_s=0.6, workers=workers, coalesce_max_ms=100)
    for i in range(100):
        sim.at(i * 0.025, lambda i=i: sim.submit(i))
    sim.run()
    assert sum(len(job) for _, job in sim.sent) == 100
    assert not any(sim.judged)
    assert max(sim.waits) <= 0.1 + 1e-9, max(sim.waits)
    assert len(sim.sent) < 100 / 2  # gathered while the worker computed


def test_a_burst_with_a_free_worker_goes_after_the_short_window_in_one_job():
    sim = Sim(forward_s=0.3)
    for i in range(10):
        sim.at(0.0001 * i, lambda i=i: sim.submit(i))
    sim.run()
    assert [(round(t, 6), len(job)) for t, job in sim.sent] == [(0.002, 10)]
