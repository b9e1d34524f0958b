"""``queuebert stats``: queues, workers and runs in progress, read from Redis alone.

Everything here comes from RQ's own keys plus the fields the BatchWorker adds to its RQ worker hash
(``qb_model``, ``qb_device``, ``qb_items``, ``qb_redis``) and the run bookkeeping in
:mod:`queuebert.keys`, so it works from any machine with the light install. Redis's own ``INFO`` says
whether it is full (``maxmemory``) or read-only: the states in which workers and producers wait.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from rq import Queue, Worker
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from queuebert import keys
from queuebert.serializer import JSONSerializer


def queue_stats(conn: redis.Redis) -> list[dict[str, Any]]:
    out = []
    for q in Queue.all(connection=conn, serializer=JSONSerializer):
        with conn.pipeline(transaction=False) as pipe:
            pipe.llen(q.key)
            pipe.zcard(StartedJobRegistry(queue=q).key)
            pipe.zcard(FailedJobRegistry(queue=q).key)
            pipe.zcard(FinishedJobRegistry(queue=q).key)
            waiting, started, failed, finished = pipe.execute()
        out.append({"name": q.name, "waiting": waiting, "started": started, "failed": failed, "finished": finished})
    return sorted(out, key=lambda row: row["name"])


def worker_stats(conn: redis.Redis) -> list[dict[str, Any]]:
    workers = Worker.all(connection=conn)
    with conn.pipeline(transaction=False) as pipe:
        for w in workers:
            pipe.hmget(w.key, *keys.WORKER_MODEL_FIELDS[:3], "qb_items", "qb_redis")
        extra = pipe.execute()
    out = []
    for w, (model, device, dtype, items, redis_state) in zip(workers, extra):
        out.append({
            "name": w.name, "state": w.get_state(), "queues": w.queue_names(), "hostname": w.hostname, "pid": w.pid,
            "model": model.decode() if model else None, "device": device.decode() if device else None,
            "dtype": dtype.decode() if dtype else None, "items_done": int(items or 0),
            "jobs_done": w.successful_job_count, "jobs_failed": w.failed_job_count,
            "last_heartbeat": w.last_heartbeat.isoformat() if w.last_heartbeat else None,
            # "ok", or what Redis refuses this worker and since when (it waits and retries meanwhile).
            "redis": redis_state.decode() if redis_state else None,
        })
    return sorted(out, key=lambda row: row["name"])


def run_stats(conn: redis.Redis, include_finished: bool = False, limit: int = 50) -> list[dict[str, Any]]:
    run_ids = [r.decode() if isinstance(r, bytes) else str(r) for r in conn.zrevrange(keys.RUNS, 0, 999)]
    with conn.pipeline(transaction=False) as pipe:
        for run_id in run_ids:
            pipe.hmget(keys.run_meta(run_id), "enqueued", "total", "done", "errors", "sealed", "created_at",
                       "updated_at", "queue")
        metas = pipe.execute()
    now = time.time()
    out, gone = [], []
    for run_id, meta in zip(run_ids, metas):
        if all(v is None for v in meta):
            gone.append(run_id)  # its keys expired: forget it
            continue
        enqueued, total, done, errors, sealed = (int(v or 0) for v in meta[:5])
        created = float(meta[5] or now)
        updated = float(meta[6] or created)
        total = total if sealed else enqueued
        finished = bool(sealed) and done >= total
        if finished and not include_finished:
            continue
        span = (updated if finished else now) - created
        rate = done / span if span > 0 and done else 0.0
        out.append({
            "run": run_id, "queue": meta[7].decode() if meta[7] else None, "done": done, "total": total,
            "errors": errors, "sealed": bool(sealed), "finished": finished, "texts_per_s": round(rate, 1),
            "eta_s": round((total - done) / rate, 1) if rate and not finished else None,
            "age_s": round(now - created, 1),
        })
        if len(out) >= limit:
            break
    if gone:
        conn.zrem(keys.RUNS, *gone)
    return out


def redis_stats(conn: redis.Redis) -> dict[str, Any]:
    """Memory against ``maxmemory`` and the server's role. ``full`` means writes that need memory
    are refused (``noeviction``): producers wait, workers finish what they hold, and readers that
    consume results are what frees it."""
    memory = conn.info("memory")
    role = conn.info("replication").get("role")
    used, limit = int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))
    return {"used_memory": used, "maxmemory": limit, "maxmemory_policy": memory.get("maxmemory_policy"),
            "full": bool(limit) and used >= limit, "role": role, "read_only": role not in (None, "master")}


def gather(conn: redis.Redis, include_finished: bool = False) -> dict[str, Any]:
    return {"redis": redis_stats(conn), "queues": queue_stats(conn), "workers": worker_stats(conn),
            "runs": run_stats(conn, include_finished=include_finished)}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _redis_line(r: dict[str, Any]) -> str:
    memory = f"used {_mib(r['used_memory'])}"
    if r["maxmemory"]:
        memory += f" of maxmemory {_mib(r['maxmemory'])} ({r['maxmemory_policy']})"
    state = []
    if r["full"]:
        state.append("FULL: writes refused until results are consumed")
    if r["read_only"]:
        state.append(f"read-only ({r['role']}): writes refused")
    return "  " + memory + (" - " + "; ".join(state) if state else "")


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "  (none)"
    cells = [[str(r.get(c) if r.get(c) is not None else "-") for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def render(stats: dict[str, Any]) -> str:
    workers = [dict(w, queues=",".join(w["queues"])) for w in stats["workers"]]
    return "\n".join([
        "redis", _redis_line(stats["redis"]),
        "queues", _table(stats["queues"], ["name", "waiting", "started", "failed", "finished"]),
        "workers", _table(workers, ["name", "state", "device", "dtype", "model", "items_done", "queues", "redis"]),
        "runs", _table(stats["runs"], ["run", "done", "total", "errors", "texts_per_s", "eta_s", "age_s"]),
    ])
