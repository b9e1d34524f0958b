"""RQ's per-job bookkeeping for many jobs at once, in one Lua call per round.

Taking a job the RQ way (``Job.fetch_many``, ``Execution.create``, ``job.prepare_for_execution``)
and completing it (``Result.create``, ``FinishedJobRegistry.add``, ``job.cleanup``,
``Execution.delete``, plus queuebert's run-stream record) costs about 340 µs of Python per job:
object construction, uuid4, datetime formatting and ~20 redis-py commands packed one by one. For
one-text jobs that is more than the forward pass. :class:`JobStore` writes exactly the same keys,
fields, scores and TTLs, but with one ``EVALSHA`` per round of jobs for taking and one for
completing, so what is left in Python per job is building a few arguments and reading a few
reply fields.

Everything RQ's tools read stays as RQ writes it (``rq info``, ``rq requeue``,
``Job.get_status()``, ``job.latest_result()``, ``job.get_executions()``, the started/finished
registries and their maintenance), because every key name comes from RQ's own classes and every
value follows RQ's conventions:

- registry scores are ``current_timestamp() + ttl`` in integer seconds (``-1`` means ``+inf``);
- execution hashes hold float timestamps (``repr`` of ``datetime.timestamp()``);
- job hashes hold ``rq.utils.utcformat`` strings.

These are computed once per call in Python and passed as ARGV. Key prefixes are derived from RQ's
classes and queuebert's run keys from :mod:`producer.keys`, so the scripts hard-code no key name.

Not handled here (callers keep RQ's Python path for them): a job whose result TTL is 0 (RQ then
deletes the job, with everything that entails, see :meth:`JobStore.fast_path`), and failures
(``handle_job_failure`` needs the full :class:`rq.job.Job`; :meth:`TakenJob.execution` gives
the :class:`rq.executions.Execution` it wants).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from base64 import b64encode
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import redis
import structlog
from rq import Queue
from rq.defaults import DEFAULT_WORKER_TTL
from rq.exceptions import DeserializationError
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.utils import utcformat, utcparse
from rq.worker import WorkerStatus

from producer import keys
from producer.serializer import ForeignJobError, JSONSerializer
from producer.settings import DEFAULT_RESULT_TTL

log = structlog.get_logger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)

# Take: pop job ids and register each as started, as Execution.create + job.prepare_for_execution
# (+ PERSIST of a job hash with an RQ ttl) + the worker's heartbeat and BUSY state would.
#
# KEYS[1]  worker hash                KEYS[2]  worker executions set
# for queue q (1-based), at k = 3q:  KEYS[k] queue list, KEYS[k+1] intermediate list,
#                                     KEYS[k+2] started registry
# ARGV[1]  want: most jobs to register, `first` included
# ARGV[2]  execution ttl (seconds)
# ARGV[3]  worker name
# ARGV[4]  execution created_at = last_heartbeat (float timestamp, as Execution.serialize writes it)
# ARGV[5]  now as rq.utils.utcformat (job started_at/last_heartbeat, worker last_heartbeat)
# ARGV[6]  rq.utils.current_timestamp() (integer seconds, for registry scores)
# ARGV[7]  worker key/executions set ttl (worker_ttl + 60, what Worker.heartbeat sets)
# ARGV[8]  execution id prefix (24 hex); the n-th job registered (from 0) gets prefix .. %08x(n)
# ARGV[9]  job key prefix            ARGV[10] execution key prefix
# ARGV[11] execution registry prefix ARGV[12] job status STARTED     ARGV[13] worker state BUSY
# ARGV[14] queue index (1-based) of `first`, 0 if none; ARGV[15] its id (already BLMOVEd into
#          that queue's intermediate list by the caller)
# Returns {taken, gone, left}; left: jobs still queued in these queues afterwards; taken: per registered job 8 fields: queue index, id, data, enqueued_at,
# result_ttl, dependency_ids, dependency_id (missing fields as nil), execution id; gone: queue index, id per job
# whose hash no longer exists (or holds no data): nothing is written for those.
#
# Idempotent: ARGV[8] is fresh per call and is recorded in the worker hash (field qb_take). A call
# that finds its own prefix there is a redelivery (redis-py re-sends a command whose reply was
# lost): it registers nothing and answers with the jobs the first delivery registered, found by
# their execution ids in the worker's executions set, so no job is left started for a worker that
# does not know it holds it.
TAKE_LUA = """
local want = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local worker, created, utc = ARGV[3], ARGV[4], ARGV[5]
local now_ts = tonumber(ARGV[6])
local job_prefix, exec_prefix, execreg_prefix = ARGV[9], ARGV[10], ARGV[11]
local started_score = now_ts + ttl
if ttl < 0 then started_score = (ttl == -1) and '+inf' or ttl end
local taken, gone = {}, {}
local n, seen = 0, 0

local function register(q, id)
  local jkey = job_prefix .. id
  local f = redis.call('HMGET', jkey, 'data', 'enqueued_at', 'result_ttl', 'dependency_ids', 'dependency_id', 'ttl')
  if not f[1] then
    gone[#gone + 1] = q
    gone[#gone + 1] = id
    return
  end
  local eid = string.format('%s%08x', ARGV[8], n)
  n = n + 1
  local composite = id .. ':' .. eid
  local ekey = exec_prefix .. composite
  redis.call('HSET', ekey, 'id', eid, 'job_id', id, 'created_at', created, 'last_heartbeat', created,
             'worker_name', worker)
  redis.call('EXPIRE', ekey, ttl)
  local rkey = execreg_prefix .. id
  redis.call('ZADD', rkey, now_ts + ttl + 60, eid)
  redis.call('EXPIRE', rkey, ttl + 60)
  redis.call('ZADD', KEYS[3 * q + 2], started_score, composite)
  redis.call('SADD', KEYS[2], composite)
  redis.call('HSET', jkey, 'last_heartbeat', utc, 'status', ARGV[12], 'started_at', utc, 'worker_name', worker)
  if f[6] and f[6] ~= '' and tonumber(f[6]) ~= 0 then
    redis.call('PERSIST', jkey)  -- a queued job's hash may expire; a started one must not
  end
  local t = #taken
  taken[t + 1] = q
  taken[t + 2] = id
  for i = 1, 5 do taken[t + 2 + i] = f[i] end
  taken[t + 8] = eid
end

local function left_queued()
  local left = 0
  for q = 1, (#KEYS - 2) / 3 do left = left + redis.call('LLEN', KEYS[3 * q]) end
  return left
end

if redis.call('HGET', KEYS[1], 'qb_take') == ARGV[8] then
  local mine = {}
  local plen = #ARGV[8]
  for _, composite in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    local id, eid = string.match(composite, '^(.*):([^:]*)$')
    if eid and string.sub(eid, 1, plen) == ARGV[8] then mine[#mine + 1] = {eid, id, composite} end
  end
  table.sort(mine, function(a, b) return a[1] < b[1] end)
  for _, m in ipairs(mine) do
    local q = 0
    for i = 1, (#KEYS - 2) / 3 do
      if redis.call('ZSCORE', KEYS[3 * i + 2], m[3]) then q = i break end
    end
    local f = redis.call('HMGET', job_prefix .. m[2], 'data', 'enqueued_at', 'result_ttl', 'dependency_ids',
                         'dependency_id')
    if q > 0 then
      local t = #taken
      taken[t + 1] = q
      taken[t + 2] = m[2]
      for i = 1, 5 do taken[t + 2 + i] = f[i] end
      taken[t + 8] = m[1]
    end
  end
  return {taken, gone, left_queued()}
end

local fq = tonumber(ARGV[14])
if fq > 0 then
  redis.call('LREM', KEYS[3 * fq + 1], 1, ARGV[15])
  seen = 1
  register(fq, ARGV[15])
end
for q = 1, (#KEYS - 2) / 3 do
  if seen >= want then break end
  local ids = redis.call('LPOP', KEYS[3 * q], want - seen)
  if ids then
    for _, id in ipairs(ids) do register(q, id) end
    seen = seen + #ids
  end
end
if seen > 0 then
  if n > 0 then redis.call('EXPIRE', KEYS[2], ttl + 60) end
  redis.call('HSET', KEYS[1], 'last_heartbeat', utc)
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  redis.call('EXPIRE', KEYS[2], ARGV[7])
  redis.call('HSET', KEYS[1], 'state', ARGV[13], 'qb_take', ARGV[8])
end
return {taken, gone, left_queued()}
"""

# Complete: for each successfully finished job, what BatchWorker._complete wrote with redis-py:
# job hash FINISHED + ended_at, RQ result entry (Result.save), FinishedJobRegistry.add,
# job.cleanup (folded: the dependents EXPIRE/EXISTS answers whether dependents exist),
# Execution.delete, and producer.results.COMPLETE_JOB_LUA's run record (grouped by run:
# stream entry and done-set guard per job, counters and TTLs once per run); then the worker's
# counters once. Execution.delete comes first (see the comment in the loop). A job whose hash no
# longer exists (a reader consumed it after another worker finished it) only loses this worker's
# execution; a run whose meta hash says `consumed` gets no record.
#
# KEYS[1]  worker hash                KEYS[2]  worker executions set
# for queue q (1-based), at k = 2q + 1: KEYS[k] started registry, KEYS[k+1] finished registry
# for run r (1-based), at k = 2 + 2 * nqueues + 4(r-1) + 1: producer.keys.run_keys order
#          (meta hash, done-jobs set, stream, jobs list)
# ARGV[1]  number of queues           ARGV[2]  ended_at (utcformat)
# ARGV[3]  execution_ended_at (float) ARGV[4]  current_timestamp() (integer seconds)
# ARGV[5]  run updated_at ("%.3f")    ARGV[6]  run ttl when a job's result ttl is not > 0
# ARGV[7]  worker name                ARGV[8]  job key prefix
# ARGV[9]  execution key prefix       ARGV[10] execution registry prefix
# ARGV[11] result key prefix          ARGV[12] dependents key suffix (after job prefix .. id)
# ARGV[13], ARGV[14] dependencies key prefix and suffix (around the id)
# ARGV[15] job status FINISHED        ARGV[16] result type SUCCESSFUL
# ARGV[17] items (worker qb_items)    ARGV[18] jobs (successful_job_count)
# ARGV[19] working seconds (total_working_time)
# then 11 per job from ARGV[20]: id, queue index, execution id, execution_started_at (float),
#   return_value (base64 of the results JSON), result ttl (resolved, never 0), has dependencies
#   (0/1), run index (0: no run), items, item errors, results JSON
# Returns the ids of jobs whose dependents set exists.
COMPLETE_LUA = """
local nq = tonumber(ARGV[1])
local ended_utc, ended_ts, now_ts = ARGV[2], ARGV[3], tonumber(ARGV[4])
local worker, job_prefix, exec_prefix, execreg_prefix = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local result_prefix, dependents_suffix, deps_prefix, deps_suffix = ARGV[11], ARGV[12], ARGV[13], ARGV[14]
local default_run_ttl = tonumber(ARGV[6])
local run_base = 2 + 2 * nq
local runs = {}
local consumed = {}
local with_dependents = {}

for i = 20, #ARGV, 11 do
  local id, q, eid = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local rt = tonumber(ARGV[i + 5])
  local jkey = job_prefix .. id
  -- What frees memory comes first: once a script has written, Redis lets it finish even at
  -- maxmemory, so completions still go through (and readers can then free memory) when producers
  -- have filled Redis up.
  local composite = id .. ':' .. eid
  redis.call('DEL', exec_prefix .. composite)
  redis.call('ZREM', KEYS[2 * q + 1], composite)
  redis.call('ZREM', execreg_prefix .. id, eid)
  redis.call('SREM', KEYS[2], composite)
  -- A job whose hash is gone was deleted or consumed by a reader (a late completion of a job that
  -- another worker already finished): writing now would resurrect what was read and deleted.
  if redis.call('EXISTS', jkey) == 1 then
    redis.call('HSET', jkey, 'status', ARGV[15], 'ended_at', ended_utc)
    local rkey = result_prefix .. id
    redis.call('XADD', rkey, 'MAXLEN', '~', '10', '*', 'type', ARGV[16], 'worker_name', worker,
               'return_value', ARGV[i + 4], 'execution_id', eid, 'execution_started_at', ARGV[i + 3],
               'execution_ended_at', ended_ts)
    if rt == -1 then redis.call('PERSIST', rkey) else redis.call('EXPIRE', rkey, rt) end
    local score = now_ts + rt
    if rt < 0 then score = (rt == -1) and '+inf' or rt end
    redis.call('ZADD', KEYS[2 * q + 2], score, id)
    local dependents_key = jkey .. dependents_suffix
    local has_dependents
    if rt > 0 then
      redis.call('EXPIRE', jkey, rt)
      has_dependents = redis.call('EXPIRE', dependents_key, rt) == 1
      if ARGV[i + 6] == '1' then redis.call('EXPIRE', deps_prefix .. id .. deps_suffix, rt) end
    else
      has_dependents = redis.call('EXISTS', dependents_key) == 1
    end
    if has_dependents then with_dependents[#with_dependents + 1] = id end
    local r = tonumber(ARGV[i + 7])
    if r > 0 then
      local k = run_base + 4 * (r - 1)
      if consumed[r] == nil then consumed[r] = redis.call('HEXISTS', KEYS[k + 1], 'consumed') == 1 end
      -- once per job, even if it ran twice; never into a run its reader has finished with
      if not consumed[r] and redis.call('SADD', KEYS[k + 2], id) == 1 then
        redis.call('XADD', KEYS[k + 3], '*', 'job', id, 'results', ARGV[i + 10])
        local acc = runs[r]
        if not acc then
          acc = {items = 0, jobs = 0, errors = 0}
          runs[r] = acc
        end
        acc.items = acc.items + tonumber(ARGV[i + 8])
        acc.jobs = acc.jobs + 1
        acc.errors = acc.errors + tonumber(ARGV[i + 9])
        acc.ttl = (rt > 0) and rt or default_run_ttl
      end
    end
  end
end

for r, acc in pairs(runs) do
  local k = run_base + 4 * (r - 1)
  redis.call('HINCRBY', KEYS[k + 1], 'done', acc.items)
  redis.call('HINCRBY', KEYS[k + 1], 'done_jobs', acc.jobs)
  if acc.errors > 0 then redis.call('HINCRBY', KEYS[k + 1], 'errors', acc.errors) end
  redis.call('HSET', KEYS[k + 1], 'updated_at', ARGV[5])
  if acc.ttl > 0 then
    for j = 1, 4 do redis.call('EXPIRE', KEYS[k + j], acc.ttl) end
  end
end

if tonumber(ARGV[18]) > 0 then
  redis.call('HINCRBY', KEYS[1], 'qb_items', ARGV[17])
  redis.call('HINCRBY', KEYS[1], 'successful_job_count', ARGV[18])
  redis.call('HINCRBYFLOAT', KEYS[1], 'total_working_time', ARGV[19])
end
return with_dependents
"""

# Heartbeat: what Execution.heartbeat writes for each running job, for all of them in one call
# (a worker can hold thousands of one-text jobs; redis-py would pack 5 commands for each).
#
# KEYS: the started registry of each queue (1-based, in the store's queue order)
# ARGV[1] last_heartbeat (float timestamp)   ARGV[2] execution ttl   ARGV[3] current_timestamp()
# ARGV[4] execution key prefix               ARGV[5] execution registry prefix
# then 3 per job from ARGV[6]: job id, execution id, queue index (1-based)
HEARTBEAT_LUA = """
local beat, ttl, now_ts = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 6, #ARGV, 3 do
  local id, eid = ARGV[i], ARGV[i + 1]
  local composite = id .. ':' .. eid
  local ekey = ARGV[4] .. composite
  -- EXPIRE first: it only re-times (so Redis lets the script go on writing at maxmemory), and an
  -- execution that has already expired is not brought back as a partial hash.
  if redis.call('EXPIRE', ekey, ttl) == 1 then
    redis.call('HSET', ekey, 'last_heartbeat', beat)
    redis.call('ZADD', KEYS[tonumber(ARGV[i + 2])], 'XX', now_ts + ttl, composite)
    local rkey = ARGV[5] .. id
    redis.call('ZADD', rkey, 'XX', now_ts + ttl + 60, eid)
    redis.call('EXPIRE', rkey, ttl + 60)
  end
end
return 0
"""

# Give back: jobs taken but not finished return to the front of their queue, as if never taken
# (Execution.delete + Job.set_status(QUEUED) + LPUSH), but only while this worker still holds them:
# a job that RQ's maintenance already requeued, or that another worker finished and a reader
# consumed, is left alone, so a give-back never queues a job twice or writes a job hash without TTL.
#
# KEYS[1] worker executions set; for queue q (1-based), at k = 2q: KEYS[k] queue list,
#         KEYS[k+1] started registry
# ARGV[1] execution key prefix  ARGV[2] execution registry prefix  ARGV[3] job key prefix
# ARGV[4] job status QUEUED; then 3 per job from ARGV[5]: job id, execution id, queue index (1-based)
# Returns the number of jobs given back.
GIVE_BACK_LUA = """
local given = 0
for i = 5, #ARGV, 3 do
  local id, eid, q = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local composite = id .. ':' .. eid
  local held = redis.call('ZREM', KEYS[2 * q + 1], composite) == 1
  redis.call('DEL', ARGV[1] .. composite)
  redis.call('ZREM', ARGV[2] .. id, eid)
  redis.call('SREM', KEYS[1], composite)
  local jkey = ARGV[3] .. id
  if held and redis.call('EXISTS', jkey) == 1 then
    redis.call('HSET', jkey, 'status', ARGV[4])
    redis.call('LPUSH', KEYS[2 * q], id)
    given = given + 1
  end
end
return given
"""

# The worker's Redis state (field qb_redis of its worker hash) for `queuebert stats`. EXPIRE first,
# with the TTL Worker.heartbeat gives the hash: it only re-times, so Redis lets the script go on
# writing at maxmemory, which is exactly when the state matters.
# KEYS[1] worker hash   ARGV[1] state text   ARGV[2] worker hash ttl
STATE_LUA = """
if redis.call('EXPIRE', KEYS[1], ARGV[2]) == 1 then
  redis.call('HSET', KEYS[1], 'qb_redis', ARGV[1])
end
return 0
"""

_COMPLETE_FIXED_ARGS = 19  # ARGV before the per-job fields (see COMPLETE_LUA's header)


@dataclass(slots=True)
class TakenJob:
    """One job registered as started by :meth:`JobStore.take`: what the worker needs to run and
    complete it, read from the job hash in the same script that registered it."""

    id: str
    queue_index: int  # index into the queues given to JobStore
    execution_id: str
    created_at: float  # execution created_at, as written to the execution hash
    started_us: int  # job started_at (same instant), microseconds since the epoch, for working time
    data: bytes  # the job hash's raw 'data' field (zlib-compressed serializer payload)
    enqueued_at: float | None
    result_ttl: int | None  # the job hash's result_ttl (None: the worker's default applies)
    has_dependencies: bool  # so completion also expires rq:job::<id>:dependencies, as job.cleanup does

    @property
    def composite_key(self) -> str:
        """``<job id>:<execution id>``, the member RQ keeps in the started registry."""
        return f"{self.id}:{self.execution_id}"

    @property
    def started_at(self) -> datetime:
        """The job hash's ``started_at`` (what ``job.started_at`` would be), for wait metrics."""
        return _EPOCH + timedelta(microseconds=self.started_us)

    def decode(self) -> tuple[str, list[Any], dict[str, Any]]:
        """``(func_name, args, kwargs)`` as ``Job.func_name/args/kwargs`` would give them.

        Raises :class:`rq.exceptions.DeserializationError` for a payload that is not JSON (a pickled
        job, say), as RQ's ``Job`` does, so callers keep one error path, and
        :class:`producer.serializer.ForeignJobError` (a ``JobError``) for one that names a function
        other than queuebert's, so the job fails with that reason.
        """
        try:
            raw = zlib.decompress(self.data)
        except zlib.error:
            raw = self.data  # RQ falls back to an uncompressed payload too
        try:
            func_name, _instance, args, kwargs = JSONSerializer.loads(raw)
        except ForeignJobError:
            raise  # readable, but names something not queuebert's: the caller reports why
        except Exception as exc:
            raise DeserializationError() from exc
        return func_name, args, kwargs

    def execution(self, connection: redis.Redis, worker_name: str) -> Execution:
        """An RQ :class:`Execution` for this job, for RQ's own Python paths (heartbeat, failure)."""
        execution = Execution(id=self.execution_id, job_id=self.id, connection=connection, worker_name=worker_name)
        execution.created_at = execution.last_heartbeat = datetime.fromtimestamp(self.created_at, tz=timezone.utc)
        return execution


@dataclass(slots=True)
class Completion:
    """A successfully finished job and what it produced."""

    job: TakenJob
    results: str  # the results JSON, encoded once with producer.results.encode_results
    run_id: str | None
    items: int
    errors: int  # items whose result is an error


def _split_template(make: Callable[[str], str]) -> tuple[str, str]:
    """The text around the id in a key RQ builds from an id, so the scripts can build the same key
    without repeating RQ's key formats (which also follow ``RQ_KEY_PREFIX``)."""
    marker = "QBIDMARKER"
    key = make(marker)
    before, found, after = key.partition(marker)
    if not found or marker in after:
        raise RuntimeError(f"cannot derive a key template from {key!r}")
    return before, after


def _prefix(make: Callable[[str], str]) -> str:
    before, after = _split_template(make)
    if after:
        raise RuntimeError(f"key template has a suffix after the id: {before!r} .. {after!r}")
    return before


def _utc_timestamp(value: bytes | None) -> float | None:
    """A job hash time (``utcformat``) as a timestamp; ``fromisoformat`` is ~20x cheaper than
    ``rq.utils.utcparse``'s ``strptime``, which stays the fallback for anything unusual."""
    if not value:
        return None
    text = value.decode()
    try:
        return datetime.fromisoformat(text.removesuffix("Z")).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return utcparse(text).timestamp()


def _has_dependencies(ids_json: bytes | None, legacy_id: bytes | None) -> bool:
    """Whether ``Job.restore`` would give a non-empty ``_dependency_ids``."""
    if ids_json:
        return bool(json.loads(ids_json))
    return bool(legacy_id)


class JobStore:
    """Takes and completes jobs of some queues for one worker, one script call per round.

    The data written is exactly what RQ's Python (and BatchWorker's pipelines before this module)
    writes, so RQ's tools and maintenance keep working; see the module docstring.
    """

    def __init__(
        self,
        connection: redis.Redis,
        worker_name: str,
        worker_key: str,
        executions_key: str,
        queues: Sequence[Queue],
        worker_ttl: int = DEFAULT_WORKER_TTL,
    ):
        self.connection = connection
        self.worker_name = worker_name
        self.worker_key = worker_key
        self.executions_key = executions_key
        self.queues = list(queues)
        # What Worker.heartbeat gives the worker hash and executions set.
        self.worker_key_ttl = worker_ttl + 60
        self._take_script = connection.register_script(TAKE_LUA)
        self._complete_script = connection.register_script(COMPLETE_LUA)
        self._heartbeat_script = connection.register_script(HEARTBEAT_LUA)
        self._give_back_script = connection.register_script(GIVE_BACK_LUA)
        self._state_script = connection.register_script(STATE_LUA)
        #: Jobs still queued in this store's queues after the last take (a burst is under way).
        self.left = 0
        self._started = [StartedJobRegistry(queue=q) for q in self.queues]
        self._take_keys = [worker_key, executions_key]
        self._complete_keys = [worker_key, executions_key]
        for q, started in zip(self.queues, self._started):
            self._take_keys += [q.key, q.intermediate_queue_key, started.key]
            self._complete_keys += [started.key, FinishedJobRegistry(queue=q).key]
        self.job_prefix = _prefix(Job.key_for)
        # Execution keys are <prefix><job id>:<execution id> (the composite key after a prefix).
        self.execution_prefix, after = _split_template(
            lambda marker: Execution(id="E", job_id=marker, connection=connection).key)
        if after != ":E":
            raise RuntimeError(f"unexpected execution key layout: {self.execution_prefix!r} .. {after!r}")
        self.execution_registry_prefix = _prefix(
            lambda marker: ExecutionRegistry(job_id=marker, connection=connection).key)
        result_prefix = _prefix(Result.get_key)
        dependents = _split_template(Job.dependents_key_for)
        if dependents[0] != self.job_prefix:
            raise RuntimeError(f"dependents key {dependents} does not start with the job key {self.job_prefix!r}")
        dependencies = _split_template(lambda marker: Job(marker, connection=connection).dependencies_key)
        self._take_static = [self.job_prefix, self.execution_prefix, self.execution_registry_prefix,
                             JobStatus.STARTED.value, WorkerStatus.BUSY.value]
        self._complete_static = [self.job_prefix, self.execution_prefix, self.execution_registry_prefix,
                                 result_prefix, dependents[1], dependencies[0], dependencies[1],
                                 JobStatus.FINISHED.value, str(Result.Type.SUCCESSFUL.value)]

    @classmethod
    def for_worker(cls, worker: Any, queues: Sequence[Queue] | None = None) -> JobStore:
        """A store for an RQ worker's name, keys, TTL and (by default) queues."""
        return cls(worker.connection, worker.name, worker.key, worker.executions_key,
                   queues if queues is not None else worker.queues, worker_ttl=worker.worker_ttl)

    # -- taking ---------------------------------------------------------------------------------

    def take(
        self, want: int, ttl: int, first: tuple[int, str] | None = None
    ) -> tuple[list[TakenJob], list[tuple[int, str]]]:
        """Pop up to ``want`` job ids from the queues in order (the first queue drained first) and
        register each as started, atomically, with what RQ writes for a started job:
        ``Execution.create(job, ttl, pipeline, worker_name)``, ``job.prepare_for_execution``, a
        PERSIST of a job hash with an RQ ``ttl``, and the worker's heartbeat and BUSY state.

        ``first`` is ``(queue index, job id)`` of a job the caller already BLMOVEd into that
        queue's intermediate list while blocking for work; it counts towards ``want``, and the
        script removes it from the intermediate list and registers it first.

        Returns the registered jobs and ``(queue index, id)`` of ids whose job hash no longer
        exists (expired or deleted while queued): nothing is registered for those and they are
        no longer in any list, so the caller only has to log them.
        """
        moment = datetime.now(timezone.utc)
        created = moment.timestamp()
        started_us = (moment - _EPOCH) // _US
        prefix = os.urandom(12).hex()  # 24 hex + an 8-hex counter: as unique as uuid4().hex
        fq, fid = (first[0] + 1, first[1]) if first is not None else (0, "")
        args = [want, ttl, self.worker_name, repr(created), utcformat(moment), int(created),
                self.worker_key_ttl, prefix, *self._take_static, fq, fid]
        taken_flat, gone_flat, self.left = self._take_script(keys=self._take_keys, args=args)
        taken: list[TakenJob] = []
        for i in range(0, len(taken_flat), 8):
            q, job_id, data, enqueued, result_ttl, dep_ids, dep_id, execution_id = taken_flat[i:i + 8]
            taken.append(TakenJob(
                id=job_id.decode(), queue_index=q - 1, execution_id=execution_id.decode(), created_at=created,
                started_us=started_us, data=data, enqueued_at=_utc_timestamp(enqueued),
                result_ttl=int(result_ttl) if result_ttl else None,
                has_dependencies=_has_dependencies(dep_ids, dep_id),
            ))
        gone = [(gone_flat[i] - 1, gone_flat[i + 1].decode()) for i in range(0, len(gone_flat), 2)]
        for q, job_id in gone:
            log.info("job gone before it started, dropped", job=job_id, queue=self.queues[q].name)
        return taken, gone

    # -- completing -----------------------------------------------------------------------------

    @staticmethod
    def fast_path(job: TakenJob, default_result_ttl: int) -> bool:
        """Whether :meth:`complete` can finish this job: not when its result TTL is 0, where RQ
        deletes the job at once (``job.cleanup(0)``), which the caller does with RQ's Python."""
        return (job.result_ttl if job.result_ttl is not None else default_result_ttl) != 0

    def complete(self, done: Sequence[Completion], default_result_ttl: int) -> list[str]:
        """Record successfully finished jobs as BatchWorker's pipeline did with redis-py: job hash
        FINISHED and ``ended_at``; RQ's result entry (``rq:results:<id>``, MAXLEN ~10, with
        ``producer.results.rq_success_fields``' fields) and its TTL; the finished registry;
        ``job.cleanup``'s EXPIREs; ``Execution.delete``; the run-stream record with
        ``COMPLETE_JOB_LUA``'s semantics (a job's entry and counts once, however often it
        completes); and the worker's ``qb_items``, ``successful_job_count`` and
        ``total_working_time``.

        Returns the ids of jobs whose dependents set exists (the caller runs
        ``queue.enqueue_dependents`` for them). Raises ValueError, before writing anything, for a
        job that is not on the :meth:`fast_path`.
        """
        if not done:
            return []
        moment = datetime.now(timezone.utc)
        ended_us = (moment - _EPOCH) // _US
        ended = moment.timestamp()
        run_index: dict[str, int] = {}
        run_keys: list[str] = []
        items = 0
        busy = 0.0
        args: list[Any] = [len(self.queues), utcformat(moment), repr(ended), int(ended), f"{time.time():.3f}",
                           DEFAULT_RESULT_TTL, self.worker_name, *self._complete_static, 0, len(done), 0]
        append = args.extend
        for c in done:
            job = c.job
            result_ttl = job.result_ttl if job.result_ttl is not None else default_result_ttl
            if result_ttl == 0:
                raise ValueError(f"job {job.id} has result_ttl 0: complete it with RQ's Python path")
            r = 0
            if c.run_id:
                r = run_index.get(c.run_id, 0)
                if not r:
                    r = run_index[c.run_id] = len(run_index) + 1
                    run_keys += keys.run_keys(c.run_id)
            encoded = c.results.encode()
            append((job.id, job.queue_index + 1, job.execution_id, repr(job.created_at),
                    b64encode(encoded), result_ttl, 1 if job.has_dependencies else 0, r, c.items, c.errors,
                    encoded))
            items += c.items
            busy += (ended_us - job.started_us) / 1_000_000  # as timedelta.total_seconds(), summed per job
        args[_COMPLETE_FIXED_ARGS - 3] = items
        args[_COMPLETE_FIXED_ARGS - 1] = repr(busy)
        replies = self._complete_script(keys=self._complete_keys + run_keys, args=args)
        return [job_id.decode() for job_id in replies]

    # -- liveness -------------------------------------------------------------------------------

    def heartbeat(self, jobs: Sequence[TakenJob], ttl: int) -> None:
        """Extend every running job's execution as ``Execution.heartbeat`` does, in one call."""
        if not jobs:
            return
        moment = datetime.now(timezone.utc)
        args: list[Any] = [repr(moment.timestamp()), ttl, int(moment.timestamp()), self.execution_prefix,
                           self.execution_registry_prefix]
        for job in jobs:
            args += (job.id, job.execution_id, job.queue_index + 1)
        self._heartbeat_script(keys=[r.key for r in self._started], args=args)

    def publish_state(self, state: str) -> None:
        """``qb_redis`` in the worker hash (see STATE_LUA), even while Redis is at maxmemory."""
        self._state_script(keys=[self.worker_key], args=[state, self.worker_key_ttl])

    # -- giving back ----------------------------------------------------------------------------

    def give_back(self, jobs: Sequence[TakenJob]) -> int:
        """Return jobs this worker still holds to the front of their queues, in one call; jobs it no
        longer holds (requeued by maintenance, finished elsewhere) only lose its bookkeeping.
        Returns how many went back."""
        if not jobs:
            return 0
        keys_: list[str] = [self.executions_key]
        for q, started in zip(self.queues, self._started):
            keys_ += [q.key, started.key]
        args: list[Any] = [self.execution_prefix, self.execution_registry_prefix, self.job_prefix,
                           JobStatus.QUEUED.value]
        # Reversed: each LPUSH puts its job in front, so the first taken ends up first again.
        for job in reversed(jobs):
            args += (job.id, job.execution_id, job.queue_index + 1)
        return int(self._give_back_script(keys=keys_, args=args))

    def delete_executions(self, jobs: Sequence[TakenJob], pipeline: Any) -> None:
        """Queue on ``pipeline`` what ``Execution.delete`` does for each job (give-back and
        failure paths, which are rare and stay in Python)."""
        for job in jobs:
            composite = job.composite_key
            pipeline.delete(self.execution_prefix + composite)
            pipeline.zrem(self._started[job.queue_index].key, composite)
            pipeline.zrem(self.execution_registry_prefix + job.id, job.execution_id)
            pipeline.srem(self.executions_key, composite)
