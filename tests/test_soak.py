"""Memory stays bounded on a long stream: producer backpressure plus a consuming reader keep Redis
small, and the worker's RSS stays flat.

Shortened in CI; in full (200,000 texts):  QB_SOAK_TEXTS=200000 pytest tests/test_soak.py -s
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

from producer import Client

from conftest import PYTHON, REPO, subprocess_env

#: The bound the README states for this configuration (max_pending 2,000, chunk 16, results
#: consumed as they arrive): Redis holds at most the pending items and their results.
REDIS_BOUND_MB = 40
#: Worker RSS is compared between these windows of the results read (as fractions of the run):
#: past the warm-up allocations, and the end. Readings are taken by result count, not by clock,
#: so each window holds readings however fast the run goes.
WARM_WINDOW = (0.2, 0.35)
LATE_WINDOW = (0.85, 1.0)
READINGS_PER_RUN = 100
#: Allowed worker RSS growth from the warm window to the late one.
RSS_GROWTH_MB = 50


def _rss_mb(pid: int) -> float:
    """Resident memory of a live process; a process that has exited has none to report."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"process {pid} reports no VmRSS: it has exited")


def test_soak_bounded_redis_and_flat_worker_rss(conn, redis_server, tiny_models, tmp_path):
    n = int(os.environ.get("QB_SOAK_TEXTS", "20000"))
    env = subprocess_env(redis_server.url, QUEUEBERT_MODEL=str(tiny_models["bert"]), QUEUEBERT_DTYPE="float32",
                         QUEUEBERT_MAX_BATCH_SIZE="64")
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([PYTHON, "-m", "queuebert_cli", "worker", "--name", "soak", "--log-level", "warning"],
                              env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    client = Client.from_url(redis_server.url)
    baseline_mb = conn.info("memory")["used_memory"] / 2**20
    redis_mb: list[float] = []
    stop = threading.Event()

    def sample_redis() -> None:
        while not stop.wait(0.25):
            redis_mb.append(conn.info("memory")["used_memory"] / 2**20)

    texts = (f"soak text {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 12) for i in range(n))
    producer = threading.Thread(target=lambda: client.enqueue_stream(texts, chunk_size=16, max_pending=2000,
                                                                     run_id="soak"))
    sampler = threading.Thread(target=sample_redis, daemon=True)
    every = max(1, n // READINGS_PER_RUN)
    rss: list[tuple[float, float]] = []  # (fraction of the results read, worker RSS in MB)
    try:
        producer.start()
        sampler.start()
        seen = 0
        for i, result in enumerate(client.ordered_results("soak", timeout=600, consume=True)):
            assert result["id"] == str(i)
            seen += 1
            if i % every == 0:
                rss.append((i / n, _rss_mb(worker.pid)))
                redis_mb.append(conn.info("memory")["used_memory"] / 2**20)
        producer.join()
        rss.append((1.0, _rss_mb(worker.pid)))
        assert worker.poll() is None, f"the worker exited with {worker.returncode} during the run"
    finally:
        stop.set()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert seen == n
    peak_redis = max(redis_mb)
    warm = [mb for f, mb in rss if WARM_WINDOW[0] <= f <= WARM_WINDOW[1]]
    late = [mb for f, mb in rss if LATE_WINDOW[0] <= f <= LATE_WINDOW[1]]
    assert warm and late, f"no worker RSS reading in a window: {rss}"
    growth = max(late) - max(warm)
    after_mb = conn.info("memory")["used_memory"] / 2**20
    print(f"soak: {n} texts, redis baseline {baseline_mb:.1f} MB, peak {peak_redis:.1f} MB, after {after_mb:.1f} MB; "
          f"worker RSS {max(warm):.0f} -> {max(late):.0f} MB ({len(warm)} and {len(late)} readings)")
    assert peak_redis < baseline_mb + REDIS_BOUND_MB
    assert growth < RSS_GROWTH_MB, f"worker RSS grew by {growth:.0f} MB: {max(warm):.0f} -> {max(late):.0f} MB"
    # Consumed runs leave (almost) nothing behind: no job hashes, results or stream entries.
    assert not list(conn.scan_iter("rq:results:*", count=1000))
    assert not list(conn.scan_iter("rq:job:*", count=1000))
