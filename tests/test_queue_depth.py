"""Queue depth in items (queuebert/queue_depth.py, producer/exporter.py): what KEDA scales on.

The gauge must count texts, not RQ's jobs, and be right at every instant of a run: while workers
drain it, while a killed worker's jobs sit in the started registry, and once RQ's recovery puts
them back in the queue (they count as waiting again). Real parts only: the session's
redis-server, `queuebert exporter` and `queuebert worker` processes, a tiny model.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue

from producer import Client
from producer.embedded_redis import RedisServer
from queuebert import keys
from queuebert.procs import LoggedProcess, free_port, start_process
from queuebert.queue_depth import known_queues, queue_keys, read_depths
from queuebert.serializer import JSONSerializer

from helpers import LOG_DIR, reap, start_worker


def test_depth_counts_items_of_every_kind_of_job(conn: redis.Redis, redis_server: RedisServer) -> None:
    client = Client.from_url(redis_server.url, queue="qd")
    run = client.enqueue_stream(({"text": f"text {i}"} for i in range(100)), chunk_size=16)  # 7 jobs: 6x16 + 4
    client.submit("one text")
    client.submit_many(["a", "b", "c"], chunk_size=3)
    # A job enqueued through RQ's own API carries no item count: it counts as one item.
    Queue("qd", connection=conn, serializer=JSONSerializer).enqueue(keys.JOB_FUNC, kwargs={"items": [
        {"id": "x", "text": "x"}, {"id": "y", "text": "y"}]})
    enqueued = time.time()
    [depth] = read_depths(conn, ["qd"])
    assert (depth.waiting_jobs, depth.waiting_items, depth.waiting_estimated) == (10, 100 + 1 + 3 + 1, False)
    assert (depth.started_jobs, depth.started_items) == (0, 0)
    assert 0 <= depth.oldest_age() < time.time() - enqueued + 5

    # A job on its way to a worker (RQ's intermediate list) still waits; a job whose hash expired
    # while queued is no work.
    queue_key, intermediate, _ = queue_keys("qd")
    first = conn.lmove(queue_key, intermediate, "LEFT", "RIGHT")
    assert first is not None
    last = conn.lrange(keys.run_jobs(run.id), -1, -1)[0]
    conn.delete(f"rq:job:{last.decode()}")
    [depth] = read_depths(conn, ["qd"])
    assert (depth.waiting_jobs, depth.waiting_items) == (9, 105 - 4)

    # Beyond `scan` jobs the items are estimated from a sample and the jobs are RQ's list length
    # (the expired job's id included); the reply says so, and the oldest is still from the head.
    [rough] = read_depths(conn, ["qd"], scan=2, sample=3)
    assert rough.waiting_jobs == 10 and rough.waiting_estimated
    assert rough.oldest_enqueued_at == depth.oldest_enqueued_at
    assert read_depths(conn, ["never-used"])[0].waiting_items == 0
    assert known_queues(conn) == ["qd"]
    with pytest.raises(ValueError):
        read_depths(conn, ["qd"], scan=0)


# -- the gauge, scraped from a running exporter while workers drain a run ---------------------


def start_exporter(url: str, queue: str) -> tuple[LoggedProcess, str]:
    from conftest import PYTHON, REPO, subprocess_env

    port = free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    proc = start_process([PYTHON, "-m", "queuebert_cli", "exporter", "--port", str(port), "--queue", queue,
                          "--log-format", "json"], env=subprocess_env(url), cwd=REPO,
                         log_path=LOG_DIR / f"exporter-{port}.log")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(base + "/metrics", timeout=2)
            return proc, base
        except httpx.TransportError:
            assert proc.poll() is None and time.monotonic() < deadline, "exporter did not start"
            time.sleep(0.1)


def scrape(base: str, queue: str) -> dict[str, float]:
    """The queue's series as {"items:waiting": ..., "jobs:started": ..., "age": ..., "up": ...}."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=5).text):
        for s in family.samples:
            if s.name == "queuebert_exporter_redis_up":
                out["up"] = s.value
            elif s.labels.get("queue") != queue:
                continue
            elif s.name == "queuebert_queue_oldest_item_age_seconds":
                out["age"] = s.value
            elif s.name in ("queuebert_queue_items", "queuebert_queue_jobs"):
                out[f"{s.name.rsplit('_', 1)[1]}:{s.labels['state']}"] = s.value
    return out


#: One checked reading: the gauge, then the waiting and started job ids and the items done.
Sample = tuple[dict[str, float], tuple[str, ...], tuple[str, ...], int]


class Truth:
    """What the gauge should read, from an atomic (MULTI) read of the queue's lists and registry,
    with item counts the test knows itself (not the field under test)."""

    def __init__(self, conn: redis.Redis, queue: str, sizes: dict[str, int], runs: list[str]):
        self.conn, self.keys, self.sizes, self.runs = conn, queue_keys(queue), sizes, runs

    def read(self) -> tuple[tuple[str, ...], tuple[str, ...], int]:
        """(waiting job ids, started job ids, items done), at one instant."""
        with self.conn.pipeline(transaction=True) as pipe:
            pipe.lrange(self.keys[0], 0, -1)
            pipe.lrange(self.keys[1], 0, -1)
            pipe.zrange(self.keys[2], 0, -1)
            for run in self.runs:
                pipe.hget(keys.run_meta(run), "done")
            queued, in_transit, started, *done = pipe.execute()
        waiting = tuple(i.decode() for i in in_transit + queued)
        held = tuple(m.decode().rsplit(":", 1)[0] for m in started)
        return waiting, held, sum(int(d or 0) for d in done)

    def items(self, ids: tuple[str, ...]) -> int:
        return sum(self.sizes[i] for i in ids)


def test_items_gauge_is_exact_while_a_run_drains_and_a_killed_workers_jobs_count_again(
        conn: redis.Redis, redis_server: RedisServer, tiny_models: dict[str, Path]) -> None:
    queue = "drain"
    client = Client.from_url(redis_server.url, queue=queue)
    big = client.enqueue_stream(({"text": f"a review of thing {i}"} for i in range(120)), chunk_size=8)
    small = client.enqueue_stream(({"text": f"short {i}"} for i in range(10)), chunk_size=1)
    sizes = {j.decode(): 8 for j in conn.lrange(keys.run_jobs(big.id), 0, -1)}
    sizes |= {j.decode(): 1 for j in conn.lrange(keys.run_jobs(small.id), 0, -1)}
    total = 130
    assert len(sizes) == 25 and sum(sizes.values()) == total
    truth = Truth(conn, queue, sizes, [big.id, small.id])
    procs: list[subprocess.Popen[bytes]] = []
    samples: list[Sample] = []

    def sample() -> dict[str, float] | None:
        """A scrape between two equal atomic reads (nothing moved meanwhile), checked exactly;
        None when the queue moved during the scrape."""
        before = truth.read()
        got = scrape(base, queue)
        if truth.read() != before:
            return None
        waiting, held, done = before
        assert got["up"] == 1
        assert got["items:waiting"] == truth.items(waiting), (got, waiting)
        assert got["jobs:waiting"] == len(waiting)
        assert got["items:started"] == truth.items(held), (got, held)
        assert got["items:waiting"] + got["items:started"] + done == total  # no item lost or counted twice
        samples.append((got, waiting, held, done))
        return got

    def sample_until(condition: Callable[[dict[str, float], Sample], bool], timeout: float,
                     what: str) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = sample()
            if got is not None and condition(got, samples[-1]):
                return got
            time.sleep(0.05)
        raise AssertionError(f"{what}: not seen within {timeout} s; last samples {samples[-3:]}")

    try:
        exporter, base = start_exporter(redis_server.url, queue)
        procs.append(exporter)
        got = sample_until(lambda g, s: True, 10, "a first reading")
        assert (got["items:waiting"], got["jobs:waiting"], got["items:started"]) == (130, 25, 0)

        # A slow worker (each forward 0.3 s longer, a few jobs at a time) drains the queue; it is
        # killed (SIGKILL) while it holds jobs, which stay in the started registry.
        w1 = start_worker(redis_server.url, tiny_models["bert"], "drain-1", forward_s=0.3, QUEUEBERT_QUEUES=queue,
                          QUEUEBERT_TAKE_JOBS="2", QUEUEBERT_MAX_POOL_ITEMS="16", QUEUEBERT_MAX_BATCH_SIZE="8")
        procs.append(w1)
        sample_until(lambda g, s: g["items:started"] > 0 and s[3] > 0, 90, "a worker holding jobs, some done")
        w1.send_signal(signal.SIGKILL)
        w1.wait(10)
        _, _, orphans, _ = samples[-1]
        got = sample_until(lambda g, s: True, 10, "a reading after the kill")
        assert got["items:started"] > 0  # a dead worker's jobs: work still to do, counted as started

        # Another worker recovers them (their executions lapse): back in the queue, they count as
        # waiting again, and the run drains to zero with every item done exactly once.
        w2 = start_worker(redis_server.url, tiny_models["bert"], "drain-2", forward_s=0.3, QUEUEBERT_QUEUES=queue,
                          QUEUEBERT_TAKE_JOBS="2", QUEUEBERT_MAX_POOL_ITEMS="16", QUEUEBERT_MAX_BATCH_SIZE="8")
        procs.append(w2)
        sample_until(lambda g, s: any(j in s[1] for j in orphans), 60, "a killed worker's job waiting again")
        got = sample_until(lambda g, s: s[3] == total, 90, "the run drained")
        assert (got["items:waiting"], got["items:started"], got["age"]) == (0, 0, 0)
        draining = [g for g, waiting, held, done in samples if 0 < done < total]
        assert len(draining) >= 5, f"only {len(draining)} exact readings while the run drained"
        assert len({g["items:waiting"] for g in draining}) >= 3  # the gauge followed the drain
        assert any(g["items:waiting"] != 8 * g["jobs:waiting"] for g in draining)  # items, not 8 x jobs
    finally:
        reap(procs)


def test_exporter_answers_without_queue_series_while_redis_is_down() -> None:
    """No Redis: the scrape still answers, fast, with redis_up 0 and no queue series (an
    autoscaler then sees no value rather than a zero that would scale workers away)."""
    with RedisServer() as server:
        url = server.url
        exporter, base = start_exporter(url, "gone")
        try:
            assert scrape(base, "gone") == {"up": 1, "items:waiting": 0, "jobs:waiting": 0, "items:started": 0,
                                            "jobs:started": 0, "age": 0}
            server.stop()
            started = time.monotonic()
            assert scrape(base, "gone") == {"up": 0}
            assert time.monotonic() - started < 8
        finally:
            reap([exporter])
