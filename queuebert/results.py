"""The result store: how a finished job is recorded in its run, and how clients read it back.

A job's results live in two places:
- RQ's own result (``rq:results:<job>``), so ``job.latest_result()`` and RQ's tools see it;
- one entry in the run's stream, with the run's progress counters: the run record
  (``queuebert/lua/run_record.lua``, included by every script that completes a job). It is added
  only the first time a job id completes, so a job that was redelivered after its worker died (and
  ran twice) appears once and is counted once, and never once a consuming reader has finished
  with the run (``consumed`` in its meta hash).
"""

from __future__ import annotations

import functools
import json
import time
from base64 import b64decode
from collections.abc import Sequence
from typing import Any

import redis

from . import keys, scripts
from .schema import ItemResult, is_error
from .scripts import ArgLayout
from .settings import DEFAULT_RESULT_TTL

#: Named arguments of complete_job.lua (``ARGV[ARG.<name>]``).
COMPLETE_JOB_ARGS = ArgLayout(("job", "items", "errors", "results", "now"))

#: What queuebert/lua/run_record.lua needs from Python, for every script that includes it.
RUN_RECORD_CONSTANTS = {"DEFAULT_RUN_TTL": DEFAULT_RESULT_TTL}

_CONSTANTS: dict[str, dict[str, Any]] = {
    "complete_job.lua": {"ARG": COMPLETE_JOB_ARGS, **RUN_RECORD_CONSTANTS},
    "finish_consumed.lua": {},
    "forget_run.lua": {},
}
_scripts: dict[tuple[int, type, str], Any] = {}


@functools.cache
def _source(name: str) -> str:
    return scripts.load("queuebert", name, _CONSTANTS[name])


def _script(connection: Any, name: str) -> Any:
    # The type is part of the key: a redis.asyncio client's script (awaitable) must never be handed
    # to a redis-py client that happens to reuse its id.
    key = (id(connection), type(connection), name)
    script = _scripts.get(key)
    if script is None:
        script = _scripts[key] = connection.register_script(_source(name))
    return script


def finish_consumed(connection: Any, pipeline: Any, run_id: str) -> Any:
    """Queue on ``pipeline`` the end of a consuming read of ``run_id`` (see finish_consumed.lua).

    On a redis.asyncio connection the script call is a coroutine: the caller awaits what this
    returns before it executes the pipeline."""
    return _script(connection, "finish_consumed.lua")(keys=keys.run_keys(run_id), client=pipeline)


def forget_run(connection: Any, pipeline: Any, run_id: str, tombstone_ttl: int) -> Any:
    """Queue on ``pipeline`` the end of a run nobody will read again (see forget_run.lua); on a
    redis.asyncio connection, await what this returns before executing the pipeline."""
    return _script(connection, "forget_run.lua")(keys=[*keys.run_keys(run_id), keys.run_cursor(run_id)],
                                                  args=[max(1, int(tombstone_ttl))], client=pipeline)


def encode_results(results: Sequence[ItemResult]) -> str:
    return json.dumps(results, separators=(",", ":"), ensure_ascii=True)


def record_job(
    connection: redis.Redis,
    pipeline: Any,
    run_id: str,
    job_id: str,
    results: Sequence[ItemResult],
    encoded: str | None = None,
) -> None:
    """Queue the run record of one finished job on ``pipeline`` (see run_record.lua: once per job,
    never into a consumed run, the run's keys re-timed by the run's own TTL)."""
    errors = sum(1 for r in results if is_error(r))
    payload = encoded if encoded is not None else encode_results(results)
    _script(connection, "complete_job.lua")(
        keys=keys.run_keys(run_id),
        args=[job_id, len(results), errors, payload, f"{time.time():.3f}"],
        client=pipeline,
    )


def decode_entry(fields: dict[bytes, bytes]) -> tuple[str, list[ItemResult]]:
    """A run-stream entry as ``(job_id, item results)``."""
    return fields[b"job"].decode(), json.loads(fields[b"results"])


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
