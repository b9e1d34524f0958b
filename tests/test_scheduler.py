"""Unit tests for the length-sorted item pool (:class:`worker.scheduler.BatchScheduler`).

No Redis and no model: entries carry a dummy item and ``ids`` of the wanted length.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from typing import Any

import pytest

from queuebert.schema import JobOptions
from worker.engine import plan_batches
from worker.scheduler import BatchScheduler, Entry

_ids = iter(range(10**9))


def entry(length: int, priority: int = 0, owner: Any = None) -> Entry:
    n = next(_ids)
    return Entry(owner=owner, index=n, item={"id": n, "text": "x" * length}, options=JobOptions(), ids=[0] * length,
                 priority=priority)


def ident(e: Entry) -> int:
    return e.item["id"]


def key(e: Entry) -> tuple[int, int]:
    """The position of an entry in the pool's sorted order."""
    return (len(e.ids), e.seq)


def padded(batch: list[Entry]) -> int:
    return len(batch) * max(len(e.ids) for e in batch)


def check_batch(s: BatchScheduler, batch: list[Entry]) -> None:
    """Shape rules every batch must keep: sorted ascending by length, at most max_batch_size rows,
    rows x longest within the token budget unless it is a single over-long row."""
    assert batch, "next_batch returned an empty batch"
    lengths = [len(e.ids) for e in batch]
    assert lengths == sorted(lengths), f"batch not sorted by length: {lengths}"
    assert len(batch) <= s.max_batch_size, f"{len(batch)} rows > max_batch_size {s.max_batch_size}"
    if len(batch) > 1:
        assert padded(batch) <= s.max_batch_tokens, (
            f"{len(batch)} rows x {max(lengths)} = {padded(batch)} > budget {s.max_batch_tokens}")


def drain_all(s: BatchScheduler, limit: int = 100_000) -> list[list[Entry]]:
    batches: list[list[Entry]] = []
    while len(s):
        batch = s.next_batch(max_wait=0)
        assert batch is not None, "next_batch returned None with entries waiting and max_wait=0"
        check_batch(s, batch)
        batches.append(batch)
        assert len(batches) < limit
    return batches


def wraps_between(prev: list[Entry], batch: list[Entry]) -> bool:
    """True when ``batch`` starts behind where ``prev`` ended in sorted order (the sweep wrapped)."""
    return key(batch[0]) < key(prev[-1])


# -- 1. sweep order ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_batch_size,max_batch_tokens", [(64, 8192), (32, 2048), (16, 300), (1, 4096)])
def test_sweep_over_whole_pool_matches_in_process_plan(max_batch_size: int, max_batch_tokens: int) -> None:
    rng = random.Random(1234)
    lengths = [rng.randint(3, 400) for _ in range(2000)]
    s = BatchScheduler(max_batch_size, max_batch_tokens)
    pool = [entry(n) for n in lengths]
    s.add(pool)
    assert len(s) == len(pool)

    batches = drain_all(s)  # check_batch: sorted, <= rows, <= budget unless a lone over-long row

    taken = [ident(e) for b in batches for e in b]
    assert len(taken) == len(pool) and set(taken) == {ident(e) for e in pool}, "not every entry exactly once"
    assert len(s) == 0
    if max_batch_tokens < 400:  # some rows are longer than the budget: each went alone
        over = [b for b in batches if padded(b) > max_batch_tokens]
        assert over and all(len(b) == 1 for b in over)

    got = sum(padded(b) for b in batches)
    ref_lengths = sorted(lengths)
    ref = sum((end - start) * ref_lengths[end - 1]
              for start, end in plan_batches(ref_lengths, max_batch_size, max_batch_tokens))
    assert got <= ref * 1.01, f"padded tokens {got} vs in-process plan {ref} ({got / ref:.4f}x)"
    # One pass over a pool given all at once: the sweep never wrapped.
    assert not any(wraps_between(a, b) for a, b in zip(batches, batches[1:]))


# -- 2. elevator continuity and starvation -------------------------------------------------------


def test_new_entries_ahead_of_cursor_ride_this_sweep_behind_it_wait_for_wrap() -> None:
    rng = random.Random(7)
    s = BatchScheduler(max_batch_size=16, max_batch_tokens=4096)
    s.add([entry(rng.randint(10, 300)) for _ in range(400)])
    first = [s.next_batch(max_wait=0) for _ in range(8)]
    assert all(b is not None for b in first)
    cursor = max(len(e.ids) for e in first[-1])
    assert 20 < cursor < 280, cursor  # the sweep is somewhere in the middle

    shorter = [entry(rng.randint(3, cursor - 1)) for _ in range(60)]
    longer = [entry(rng.randint(cursor + 1, 350)) for _ in range(60)]
    mixed = shorter + longer
    rng.shuffle(mixed)
    s.add(mixed)
    short_ids = {ident(e) for e in shorter}

    batches = drain_all(s)
    # The first batch after the additions continues upward from the cursor.
    assert len(batches[0][0].ids) >= cursor
    wrap = next(i for i in range(1, len(batches)) if wraps_between(batches[i - 1], batches[i]))
    before = [e for b in batches[:wrap] for e in b]
    after = [e for b in batches[wrap:] for e in b]
    # Up to the wrap the sweep only moves upward.
    assert all(key(a) < key(b) for a, b in zip(before, before[1:]))
    # New longer entries ride this sweep, except one that arrived at a length the sweep then
    # stood at between two batches: that one waits for the next sweep (the no-starvation rule).
    stood_at = {len(b[-1].ids) for b in batches[:wrap]}
    deferred = [e for e in longer if ident(e) not in {ident(x) for x in before}]
    assert all(len(e.ids) in stood_at for e in deferred), "a new longer entry missed this sweep"
    assert len(deferred) <= len(longer) // 4
    assert short_ids <= {ident(e) for e in after}, "new shorter entries were taken before the sweep wrapped"
    assert not any(wraps_between(a, b) for a, b in zip(batches[wrap:], batches[wrap + 1:])), "wrapped twice"


def _sweeps_until_taken(s: BatchScheduler, target: Entry, feed, max_batches: int = 2000) -> tuple[int | None, int]:
    """Drain one batch at a time, calling ``feed()`` (which adds new entries) before each;
    return (number of wraps seen before ``target`` was taken or None if never, batches run)."""
    wraps, prev = 0, None
    for n in range(max_batches):
        feed()
        batch = s.next_batch(max_wait=0)
        assert batch is not None
        check_batch(s, batch)
        if prev is not None and wraps_between(prev, batch):
            wraps += 1
        if any(e is target for e in batch):
            return wraps, n + 1
        prev = batch
    return None, max_batches


def test_long_item_not_starved_by_stream_of_short_texts() -> None:
    rng = random.Random(11)
    s = BatchScheduler(max_batch_size=32, max_batch_tokens=4096)
    s.add([entry(rng.randint(3, 12)) for _ in range(200)])
    s.next_batch(max_wait=0)  # the sweep is under way among the short ones
    long = entry(400)
    s.add([long])

    def feed() -> None:  # as many new short texts as a batch takes: the pool never shrinks
        s.add([entry(rng.randint(3, 12)) for _ in range(32)])

    wraps, n = _sweeps_until_taken(s, long, feed)
    assert wraps is not None, f"the long item was never taken in {n} batches"
    assert wraps <= 2, f"the long item was taken only after {wraps} wraps of the sweep"


@pytest.mark.parametrize("stream_len,waiting_len,max_batch_tokens,per_batch", [(5, 400, 4096, 16), (512, 10, 16384, 8)],
                         ids=["short-stream", "truncated-stream"])
def test_waiting_item_not_starved_by_stream_of_equal_length_texts(
        stream_len: int, waiting_len: int, max_batch_tokens: int, per_batch: int) -> None:
    # per_batch new texts between batches, fewer than a batch holds (32 rows): the pool never grows.
    s = BatchScheduler(max_batch_size=32, max_batch_tokens=max_batch_tokens)
    s.add([entry(stream_len) for _ in range(32)])
    s.next_batch(max_wait=0)  # the sweep now stands at stream_len
    waiting = entry(waiting_len)
    s.add([waiting])

    def feed() -> None:
        s.add([entry(stream_len) for _ in range(per_batch)])

    wraps, n = _sweeps_until_taken(s, waiting, feed)
    assert wraps is not None, f"length-{waiting_len} item never taken in {n} batches of a length-{stream_len} stream"
    assert wraps <= 2


# -- 3. priority ---------------------------------------------------------------------------------


@pytest.mark.parametrize("urgent_len", [5, 150, 399, 5000])
def test_urgent_entry_is_in_the_very_next_batch(urgent_len: int) -> None:
    rng = random.Random(3)
    s = BatchScheduler(max_batch_size=32, max_batch_tokens=4096)
    s.add([entry(rng.randint(3, 400), priority=1) for _ in range(1500)])
    for _ in range(10):  # move the sweep away from the start
        s.next_batch(max_wait=0)
    urgent = entry(urgent_len, priority=0)
    s.add([urgent])

    before = {key(e) for e in list(s._entries.values())}
    batch = s.next_batch(max_wait=0)
    assert batch is not None
    assert any(e is urgent for e in batch), f"urgent entry (length {urgent_len}) not in the next batch"
    check_batch(s, batch)
    # Cut around it: a run of neighbours in sorted order, nothing left waiting between its ends.
    lo, hi = key(batch[0]), key(batch[-1])
    assert not any(lo < k < hi for k in before - {key(e) for e in batch}), "the batch is not a contiguous run"
    if urgent_len <= 400:
        assert len(batch) > 1  # grown around the urgent entry, not a forward for one row


def test_urgent_entry_does_not_wait_for_max_wait() -> None:
    s = BatchScheduler(max_batch_size=32, max_batch_tokens=4096)
    s.add([entry(n, priority=1) for n in range(10, 400, 3)])
    for _ in range(2):
        s.next_batch(max_wait=0)
    urgent = entry(20, priority=0)
    s.add([urgent])
    t0 = time.monotonic()
    batch = s.next_batch(max_wait=5.0)
    assert time.monotonic() - t0 < 1.0
    assert batch is not None and any(e is urgent for e in batch)


# -- 4. max_wait, timeout, close -----------------------------------------------------------------


def test_partial_batch_waits_for_max_wait() -> None:
    s = BatchScheduler(max_batch_size=32, max_batch_tokens=4096)
    t0 = time.monotonic()
    s.add([entry(10), entry(20), entry(30)])
    batch = s.next_batch(max_wait=0.2)
    elapsed = time.monotonic() - t0
    assert batch is not None and len(batch) == 3
    assert elapsed >= 0.15, f"returned after {elapsed:.3f}s, before max_wait"
    assert elapsed < 2.0


def test_partial_batch_wait_counts_from_oldest_arrival() -> None:
    s = BatchScheduler(max_batch_size=32, max_batch_tokens=4096)
    t0 = time.monotonic()
    s.add([entry(10)])
    time.sleep(0.15)
    s.add([entry(20)])  # a newer arrival must not restart the wait
    batch = s.next_batch(max_wait=0.2)
    elapsed = time.monotonic() - t0
    assert batch is not None and len(batch) == 2
    assert 0.15 <= elapsed < 0.32, f"{elapsed:.3f}s"


def test_full_batch_returns_at_once() -> None:
    s = BatchScheduler(max_batch_size=16, max_batch_tokens=4096)
    s.add([entry(10) for _ in range(16)])
    t0 = time.monotonic()
    batch = s.next_batch(max_wait=5.0)
    elapsed = time.monotonic() - t0
    assert batch is not None and len(batch) == 16
    assert elapsed < 0.1, f"a full batch waited {elapsed:.3f}s"


def test_budget_bound_batch_returns_at_once() -> None:
    s = BatchScheduler(max_batch_size=64, max_batch_tokens=1000)
    s.add([entry(100) for _ in range(11)])  # 10 rows fill the token budget
    t0 = time.monotonic()
    batch = s.next_batch(max_wait=5.0)
    assert time.monotonic() - t0 < 0.1
    assert batch is not None and len(batch) == 10


def test_empty_pool_times_out_with_none() -> None:
    s = BatchScheduler(max_batch_size=16, max_batch_tokens=4096)
    t0 = time.monotonic()
    assert s.next_batch(max_wait=0.005, timeout=0.1) is None
    elapsed = time.monotonic() - t0
    assert 0.08 <= elapsed < 1.0, f"{elapsed:.3f}s"


def test_add_wakes_waiting_next_batch() -> None:
    s = BatchScheduler(max_batch_size=4, max_batch_tokens=4096)
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append((s.next_batch(max_wait=0, timeout=5.0), time.monotonic())))
    t.start()
    time.sleep(0.1)
    added = time.monotonic()
    s.add([entry(10) for _ in range(4)])
    t.join(timeout=5)
    assert not t.is_alive()
    batch, done = out[0]
    assert batch is not None and len(batch) == 4
    assert done - added < 0.5


@pytest.mark.parametrize("pooled", [False, True], ids=["empty-pool", "waiting-for-max-wait"])
def test_close_wakes_waiting_next_batch(pooled: bool) -> None:
    s = BatchScheduler(max_batch_size=16, max_batch_tokens=4096)
    if pooled:
        s.add([entry(10)])
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append((s.next_batch(max_wait=10.0, timeout=10.0), time.monotonic())))
    t.start()
    time.sleep(0.1)
    assert t.is_alive()
    closed = time.monotonic()
    s.close()
    t.join(timeout=5)
    assert not t.is_alive(), "close() did not wake next_batch"
    batch, done = out[0]
    assert batch is None
    assert done - closed < 0.5, f"next_batch returned {done - closed:.3f}s after close()"
    assert s.next_batch(max_wait=0) is None  # closed for good
    assert len(s) == (1 if pooled else 0)  # nothing lost: drain() can still give it back


# -- 5. thread safety ----------------------------------------------------------------------------


def test_concurrent_add_and_take_every_entry_exactly_once() -> None:
    total = 20_000
    rng = random.Random(99)
    s = BatchScheduler(max_batch_size=64, max_batch_tokens=8192)
    pool = [entry(rng.randint(1, 300), priority=rng.choice([0, 1, 1, 1])) for _ in range(total)]
    errors: list[BaseException] = []
    produced = threading.Event()
    overlapped = 0  # batches taken while the producer was still adding

    def produce() -> None:
        try:
            r = random.Random(5)
            i = 0
            while i < total:
                n = r.randint(1, 120)
                s.add(pool[i:i + n])
                i += n
                if r.random() < 0.5:
                    time.sleep(0.0005 if r.random() < 0.5 else 0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            produced.set()

    taken: list[int] = []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so unguarded sections would interleave
    try:
        producer = threading.Thread(target=produce)
        producer.start()
        deadline = time.monotonic() + 60
        while len(taken) < total and time.monotonic() < deadline:
            batch = s.next_batch(max_wait=0.001, timeout=0.05)
            if batch is None:
                continue
            check_batch(s, batch)
            taken.extend(ident(e) for e in batch)
            if not produced.is_set():
                overlapped += 1
        producer.join(timeout=10)
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors
    assert len(taken) == total, f"took {len(taken)} of {total}"
    assert len(set(taken)) == total, "an entry came out twice"
    assert set(taken) == {ident(e) for e in pool}
    assert len(s) == 0 and s.next_batch(max_wait=0, timeout=0.01) is None
    assert overlapped >= 10, f"only {overlapped} batches overlapped the adds: the test did not exercise concurrency"


# -- 6. drain ------------------------------------------------------------------------------------


def test_drain_returns_everything_waiting_and_empties_the_pool() -> None:
    rng = random.Random(21)
    s = BatchScheduler(max_batch_size=16, max_batch_tokens=2048)
    owner = object()
    pool = [entry(rng.randint(3, 200), priority=rng.choice([0, 1]), owner=owner) for _ in range(300)]
    s.add(pool)
    taken = {ident(e) for _ in range(5) for e in s.next_batch(max_wait=0)}

    rest = s.drain()
    assert len(taken) + len(rest) == len(pool)
    assert {ident(e) for e in rest} == {ident(e) for e in pool} - taken
    assert len({ident(e) for e in rest}) == len(rest)
    assert all(e.owner is owner for e in rest)
    assert len(s) == 0
    assert s.drain() == []
    assert s.next_batch(max_wait=0, timeout=0.05) is None

    # Still usable afterwards (priority queues included).
    again = [entry(50, priority=1), entry(60, priority=0)]
    s.add(again)
    batch = s.next_batch(max_wait=0)
    assert batch is not None and {ident(e) for e in batch} == {ident(e) for e in again}
    assert len(s) == 0


def test_a_pool_run_dry_starts_the_next_sweep_at_the_shortest():
    """One job at a time into an empty pool (light load): its items are cut as one sorted pass,
    as plan_batches would cut them, not split at where the last sweep stopped."""
    s = BatchScheduler(max_batch_size=64, max_batch_tokens=1024)
    s.add([entry(n) for n in (40, 60, 80)])
    drain_all(s)  # the sweep stopped at length 80
    rng = random.Random(7)
    lengths = [rng.randint(10, 150) for _ in range(28)]
    s.add([entry(n) for n in lengths])
    batches = drain_all(s)
    assert len(batches[0][0].ids) == min(lengths)
    assert [len(b) for b in batches] == [end - start for start, end in plan_batches(sorted(lengths), 64, 1024)]
