"""The per-job cost of taking and completing jobs (worker.job_store.JobStore) in two checkouts of
queuebert, measured in one process against one Redis, alternating on identical jobs: Python CPU
time and Redis-side script time (INFO commandstats). For a change to the scripts or their
arguments, compare the change against its base in one invocation:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/job_store_ab.py OLD_TREE NEW_TREE [JOBS ITEMS ROUNDS]

(e.g. ``git worktree add /tmp/base main`` for OLD_TREE). The minimum over rounds is the figure least
disturbed by other processes; the median is printed beside it.
"""
from __future__ import annotations

import importlib
import statistics
import sys
import time
from types import ModuleType
from typing import Any

import redis


def load_tree(path: str) -> tuple[ModuleType, ModuleType, dict[str, ModuleType]]:
    """``worker.job_store`` and ``queuebert.results`` of the checkout at ``path``, and every module
    of it that they imported (kept apart from the other checkout's)."""
    sys.path.insert(0, path)
    for m in [m for m in list(sys.modules) if m.split(".")[0] in ("producer", "worker")]:
        del sys.modules[m]
    js = importlib.import_module("worker.job_store")
    res = importlib.import_module("queuebert.results")
    mods = {m: sys.modules[m] for m in list(sys.modules) if m.split(".")[0] in ("producer", "worker")}
    sys.path.remove(path)
    return js, res, mods


OLD, NEW = sys.argv[1], sys.argv[2]
N, ITEMS, ROUNDS = (int(a) for a in (sys.argv[3:6] if len(sys.argv) > 5 else (2000, 1, 12)))
old_js, old_res, old_mods = load_tree(OLD)
new_js, new_res, new_mods = load_tree(NEW)
for m, mod in new_mods.items():
    sys.modules[m] = mod  # the new checkout's producer enqueues for both (the job contract is shared)
from rq import Queue  # noqa: E402
from rq.worker import SimpleWorker  # noqa: E402

from producer import Client  # noqa: E402
from producer.embedded_redis import RedisServer  # noqa: E402
from queuebert.serializer import JSONSerializer  # noqa: E402


def usec(conn: redis.Redis) -> int:
    """Microseconds Redis has spent in scripts so far."""
    s = conn.info("commandstats")
    return sum(v["usec"] for k, v in s.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))

def one(conn: redis.Redis, js: Any, res: Any) -> dict[str, float]:
    """Take and complete N fresh jobs with one checkout's JobStore; per-job µs of each part."""
    conn.flushdb()
    Client(conn).submit_many([f"text number {i}" for i in range(N * ITEMS)], chunk_size=ITEMS)
    w = SimpleWorker([Queue("default", connection=conn, serializer=JSONSerializer)], connection=conn, name="ab",
                     serializer=JSONSerializer)
    store = js.JobStore.for_worker(w)
    out = dict.fromkeys(["take_cpu", "complete_cpu", "take_redis", "complete_redis"], 0.0)
    while True:
        r0, c0 = usec(conn), time.process_time()
        taken, _ = store.take(256, 30)
        c1, r1 = time.process_time(), usec(conn)
        if not taken:
            break
        done = []
        for t in taken:
            kw = t.decode()[2]
            r = [{"id": it["id"], "label": "POSITIVE", "score": 0.75, "scores": {"POSITIVE": 0.75, "NEGATIVE": 0.25}}
                 for it in kw["items"]]
            done.append(js.Completion(t, res.encode_results(r), kw["run"], len(r), 0))
        r2, c2 = usec(conn), time.process_time()
        store.complete(done, 500)
        c3, r3 = time.process_time(), usec(conn)
        out["take_cpu"] += c1 - c0
        out["complete_cpu"] += c3 - c2
        out["take_redis"] += (r1 - r0) / 1e6
        out["complete_redis"] += (r3 - r2) / 1e6
    assert conn.zcard("rq:finished:default") == N
    return {k: 1e6 * v / N for k, v in out.items()}


with RedisServer() as server:
    conn = redis.Redis.from_url(server.url)
    rows: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    pair = [("old", old_js, old_res), ("new", new_js, new_res)]
    for i in range(ROUNDS):
        for tag, js, res in (pair if i % 2 == 0 else pair[::-1]):  # neither always goes first
            rows[tag].append(one(conn, js, res))
    print(f"old: {OLD}  new: {NEW}")
    print(f"{N} jobs of {ITEMS} item(s), {ROUNDS} alternating rounds; per job, µs: min (median)")
    for k in rows["old"][0]:
        a = [r[k] for r in rows["old"]]
        b = [r[k] for r in rows["new"]]
        print(f"  {k:15s} old {min(a):7.2f} ({statistics.median(a):7.2f})"
              f"  new {min(b):7.2f} ({statistics.median(b):7.2f})"
              f"  new/old {min(b)/min(a):5.2f} ({statistics.median(b)/statistics.median(a):5.2f})")
