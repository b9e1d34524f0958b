"""Memory stays bounded on a long stream: producer backpressure plus a consuming reader keep Redis
small, and the worker's RSS stays flat.

Shortened in CI; in full (200,000 texts):  QB_SOAK_TEXTS=200000 pytest tests/test_soak.py -s
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

from conftest import PYTHON, REPO, subprocess_env
from producer import Client

#: The bound the README states for this configuration (max_pending 2,000, chunk 16, results
#: consumed as they arrive): Redis holds at most the pending items and their results.
REDIS_BOUND_MB = 40


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_soak_bounded_redis_and_flat_worker_rss(conn, redis_server, tiny_models, tmp_path):
    n = int(os.environ.get("QB_SOAK_TEXTS", "20000"))
    env = subprocess_env(redis_server.url, QUEUEBERT_MODEL=str(tiny_models["bert"]), QUEUEBERT_DTYPE="float32",
                         QUEUEBERT_MAX_BATCH_SIZE="64")
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([PYTHON, "-m", "producer.cli", "worker", "--name", "soak", "--log-level", "warning"],
                              env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    client = Client.from_url(redis_server.url)
    baseline_mb = conn.info("memory")["used_memory"] / 2**20
    samples: list[tuple[int, float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            done = client.run_progress("soak")["done"]
            samples.append((done, conn.info("memory")["used_memory"] / 2**20, _rss_mb(worker.pid)))

    texts = (f"soak text {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 12) for i in range(n))
    producer = threading.Thread(target=lambda: client.enqueue_stream(texts, chunk_size=16, max_pending=2000,
                                                                     run_id="soak"))
    sampler = threading.Thread(target=sample, daemon=True)
    try:
        producer.start()
        sampler.start()
        seen = 0
        for i, result in enumerate(client.ordered_results("soak", timeout=600, consume=True)):
            assert result["id"] == str(i)
            seen += 1
        producer.join()
    finally:
        stop.set()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert seen == n
    peak_redis = max(m for _, m, _ in samples)
    # Worker RSS: compare the first and last quarter of the run (after warm-up allocations).
    quarter = [r for d, _, r in samples if n * 0.2 <= d <= n * 0.35]
    last = [r for d, _, r in samples if d >= n * 0.85]
    growth = (max(last) - max(quarter)) if quarter and last else 0.0
    after_mb = conn.info("memory")["used_memory"] / 2**20
    print(f"soak: {n} texts, redis baseline {baseline_mb:.1f} MB, peak {peak_redis:.1f} MB, after {after_mb:.1f} MB; "
          f"worker RSS {max(quarter) if quarter else 0:.0f} -> {max(last) if last else 0:.0f} MB")
    assert peak_redis < baseline_mb + REDIS_BOUND_MB
    assert growth < 50, f"worker RSS grew by {growth:.0f} MB"
    # Consumed runs leave (almost) nothing behind: no job hashes, results or stream entries.
    assert not list(conn.scan_iter("rq:results:*", count=1000))
    assert not list(conn.scan_iter("rq:job:*", count=1000))
