"""A Redis with `maxmemory` (noeviction, as managed Redis services run it) and a stream several times
larger than it: the producer waits for room, the workers keep completing, a consuming reader frees
memory, and every item arrives exactly once, in order. Nothing crashes on the way."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from producer import Client

from helpers import start_worker

MAXMEMORY = 3 * 2**20
TIMEOUT = 300


def _diagnose(admin: redis.Redis) -> None:
    """What Redis holds when a run stalls, for the failure message."""
    from collections import Counter

    kinds = Counter(k.decode().split(":")[1] if b":" in k else k.decode() for k in admin.keys("*"))
    memory = admin.info("memory")
    print(f"\nstalled: used {memory['used_memory']} of {memory['maxmemory']}; queue {admin.llen('rq:queue:default')}; "
          f"keys {dict(kinds)}; run {admin.hgetall('qb:run:{full-run}')}")


def _stream(n: int) -> list[dict[str, str]]:
    """Texts of random words: zlib (which RQ applies to job payloads) cannot shrink them much, so
    the stream really is several times maxmemory inside Redis too."""
    rng = random.Random(7)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(5000)]
    return [{"id": str(i), "text": " ".join(rng.choice(vocab) for _ in range(rng.randint(20, 60)))} for i in range(n)]


@pytest.mark.parametrize("reader", ["from the start", "after the producer waited"])
def test_stream_larger_than_maxmemory_completes_exactly_once(tiny_models, reader, capsys):
    from producer.embedded_redis import RedisServer

    items = _stream(40_000)
    size = sum(len(json.dumps(it)) for it in items)
    assert size > 3 * MAXMEMORY, "the stream must be several times maxmemory"
    with RedisServer(extra_args=["--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction"]) as server:
        admin = redis.Redis.from_url(server.url)
        client = Client.from_url(server.url, redis_full_timeout=120)
        workers = [start_worker(server.url, tiny_models["bert"], f"full-{i}", QUEUEBERT_HEARTBEAT_INTERVAL="2")
                   for i in range(2)]
        outcome: dict[str, Any] = {}
        peak = [0]

        def produce() -> None:
            try:
                # No count-based backpressure: memory alone throttles this producer.
                outcome["run"] = client.enqueue_stream(items, chunk_size=32, max_pending=0, run_id="full-run")
            except BaseException as exc:  # reported by the assertions below
                outcome["error"] = exc

        def watch_memory() -> None:
            while "run" not in outcome and "error" not in outcome:
                peak[0] = max(peak[0], int(admin.info("memory")["used_memory"]))
                time.sleep(0.05)

        def waited() -> list[dict[str, Any]]:
            return [e for e in logs if str(e.get("event", "")).startswith("Redis is full")]

        producer = threading.Thread(target=produce, daemon=True)
        watcher = threading.Thread(target=watch_memory, daemon=True)
        capture = capture_logs()
        logs = capture.__enter__()  # until the end of the test: the producer logs from its thread
        producer.start()
        watcher.start()
        try:
            if reader == "after the producer waited":
                deadline = time.time() + 60
                while not waited():
                    assert time.time() < deadline, "the producer never had to wait for room"
                    time.sleep(0.05)
                time.sleep(3)  # the producer waits, the workers complete what is queued, nobody reads
                assert producer.is_alive() and "error" not in outcome, outcome.get("error")
            try:
                results = list(client.ordered_results("full-run", timeout=TIMEOUT, consume=True))
            except TimeoutError:
                _diagnose(admin)
                raise
            producer.join(timeout=60)
            assert "error" not in outcome, repr(outcome.get("error"))
            ids = [r["id"] for r in results]
            assert len(ids) == len(items) and len(set(ids)) == len(items), (
                f"{len(items) - len(set(ids))} lost, {len(ids) - len(set(ids))} duplicated")
            assert ids == [it["id"] for it in items]
            assert not [r for r in results if "error" in r][:1]
            assert waited(), "the producer never waited for room: the test proved nothing"
            assert peak[0] >= 0.85 * MAXMEMORY
            assert all(w.poll() is None for w in workers), "a worker died"
        finally:
            capture.__exit__(None, None, None)
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                w.wait(timeout=60)
        assert [w.returncode for w in workers] == [0, 0]
        logs = "".join(w.log_path.read_text(errors="replace") for w in workers)  # type: ignore[attr-defined]
        assert "Traceback" not in logs
        with capsys.disabled():
            print(f"\nfull redis ({reader}): {len(items)} texts, {size / 2**20:.1f} MiB of JSON, maxmemory "
                  f"{MAXMEMORY / 2**20:.0f} MiB, peak used_memory {peak[0] / 2**20:.1f} MiB; 0 lost, 0 duplicated")
