"""The result store: how a finished job is recorded in its run, and how clients read it back.

A job's results live in two places, both written in the same pipeline:
- RQ's own result (``rq:results:<job>``), so ``job.latest_result()`` and RQ's tools see it;
- one entry in the run's stream, written by :data:`COMPLETE_JOB_LUA`, which also counts the run's
  progress. The script adds the entry only the first time a job id completes, so a job that was
  redelivered after its worker died (and ran twice) appears once and is counted once, and never
  once a consuming reader has finished with the run (``consumed`` in its meta hash).
"""

from __future__ import annotations

import json
import time
from base64 import b64decode
from collections.abc import Sequence
from typing import Any

import redis

from . import keys
from .schema import ItemResult, is_error

# KEYS: run meta, done-jobs set, stream, jobs list. ARGV: job id, items, errors, results JSON, ttl, now.
COMPLETE_JOB_LUA = """
if redis.call('HEXISTS', KEYS[1], 'consumed') == 1 or redis.call('SADD', KEYS[2], ARGV[1]) == 0 then
  return 0
end
redis.call('XADD', KEYS[3], '*', 'job', ARGV[1], 'results', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'done', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'done_jobs', 1)
if tonumber(ARGV[3]) > 0 then
  redis.call('HINCRBY', KEYS[1], 'errors', ARGV[3])
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[6])
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ttl) end
end
return 1
"""

# The end of a consuming read: the run's stream, job list and done set go; its meta hash stays
# (small, until its TTL, for `stats --all-runs`) marked `consumed`, which both completion scripts
# check, so a late completion never reopens the run. The DEL comes first: once a script has
# written, Redis lets it finish even at maxmemory, which is when readers free memory.
# KEYS: run meta, done-jobs set, stream, jobs list (producer.keys.run_keys order).
FINISH_CONSUMED_LUA = """
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'consumed', 1)
end
return 0
"""

_scripts: dict[tuple[int, str], Any] = {}


def _script(connection: redis.Redis, source: str) -> Any:
    key = (id(connection), source)
    script = _scripts.get(key)
    if script is None:
        script = _scripts[key] = connection.register_script(source)
    return script


def _complete_script(connection: redis.Redis) -> Any:
    return _script(connection, COMPLETE_JOB_LUA)


def finish_consumed(connection: redis.Redis, pipeline: Any, run_id: str) -> None:
    """Queue on ``pipeline`` the end of a consuming read of ``run_id`` (see FINISH_CONSUMED_LUA)."""
    _script(connection, FINISH_CONSUMED_LUA)(keys=keys.run_keys(run_id), client=pipeline)


def encode_results(results: Sequence[ItemResult]) -> str:
    return json.dumps(results, separators=(",", ":"), ensure_ascii=True)


def record_job(
    connection: redis.Redis,
    pipeline: Any,
    run_id: str,
    job_id: str,
    results: Sequence[ItemResult],
    ttl: int,
    encoded: str | None = None,
) -> None:
    """Queue the run-stream entry and progress counters of one finished job on ``pipeline``."""
    errors = sum(1 for r in results if is_error(r))
    payload = encoded if encoded is not None else encode_results(results)
    _complete_script(connection)(
        keys=keys.run_keys(run_id),
        args=[job_id, len(results), errors, payload, ttl, f"{time.time():.3f}"],
        client=pipeline,
    )


def decode_entry(fields: dict[bytes, bytes]) -> tuple[str, list[ItemResult]]:
    """A run-stream entry as ``(job_id, item results)``."""
    return fields[b"job"].decode(), json.loads(fields[b"results"])


def rq_success_fields(encoded: str, worker_name: str, execution_id: str, started: float, ended: float) -> dict[str, Any]:
    """An ``rq:results:<job>`` entry of type SUCCESSFUL, as RQ's ``Result.serialize`` writes it,
    from results already JSON-encoded (so a job's results are encoded once, not once per copy)."""
    from base64 import b64encode

    from rq.results import Result

    return {
        "type": Result.Type.SUCCESSFUL.value,
        "worker_name": worker_name,
        "return_value": b64encode(encoded.encode()).decode(),
        "execution_id": execution_id,
        "execution_started_at": started,
        "execution_ended_at": ended,
    }


def decode_rq_return_value(payload: dict[bytes, bytes]) -> Any:
    """The return value stored in an ``rq:results:<job>`` stream entry (base64 of our JSON)."""
    raw = payload.get(b"return_value")
    if raw is None:
        return None
    return json.loads(b64decode(raw))


def decode_rq_failure(payload: dict[bytes, bytes]) -> str | None:
    """The traceback text of a failed RQ result entry, if it is one."""
    import zlib

    raw = payload.get(b"exc_string")
    if raw is None:
        return None
    return zlib.decompress(b64decode(raw)).decode(errors="replace")
