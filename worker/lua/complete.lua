-- Complete: finish successfully computed jobs as RQ's handle_job_success would, for many jobs in one
-- call: job hash FINISHED + ended_at, the RQ result entry (Result.create), FinishedJobRegistry.add,
-- job.cleanup's EXPIREs, Execution.delete, the worker's counters; plus each job's run record
-- (run_record.lua, counted once per run).
--
-- Not done here, left to the caller (worker.rq_completion, RQ's own handle_job_success): a job whose
-- dependents set exists. RQ moves dependents to its ready registry in the same transaction as the
-- completion, so a worker that dies in between leaves them where maintenance finds them; this
-- script writes nothing for such a job and returns its id. (Jobs with other RQ features the fast
-- path does not implement never reach it: worker.rq_completion.needs_rq.)
--
-- A job whose hash no longer exists (a reader consumed it after another worker finished it) only
-- loses this worker's execution: writing now would bring back what was read and deleted.
--
-- KEYS[1]  worker hash                KEYS[2]  worker executions set
-- for queue q (1-based), at k = 2q + 1: KEYS[k] started registry, KEYS[k+1] finished registry
-- for run r (1-based), at k = 2 + 2 * ARG.queues + 4(r-1): KEYS[k+1..k+4] the run's keys
--          (queuebert.keys.run_keys order)
-- ARGV[ARG.queues]              number of queues
-- ARGV[ARG.ended_at]            job ended_at (utcformat)
-- ARGV[ARG.execution_ended_at]  the result's execution_ended_at (float timestamp)
-- ARGV[ARG.now_ts]              rq.utils.current_timestamp() (integer seconds, for registry scores)
-- ARGV[ARG.now]                 run updated_at ("%.3f" seconds)
-- ARGV[ARG.worker]              worker name
-- ARGV[ARG.ended_us]            job ended_at in microseconds since the epoch (for working time)
-- then per job, at i, i + JOB_SIZE, ... (i starting after the fixed arguments):
-- ARGV[i + JOB.id]                    job id
-- ARGV[i + JOB.queue]                 queue index (1-based)
-- ARGV[i + JOB.execution_id]          execution id
-- ARGV[i + JOB.execution_started_at]  execution created_at (float timestamp)
-- ARGV[i + JOB.return_value]          base64 of the results JSON (Result.serialize's return_value)
-- ARGV[i + JOB.result_ttl]            result ttl, resolved with the worker's default (never 0)
-- ARGV[i + JOB.has_dependencies]      1 if the job depends on others (its dependencies key expires too)
-- ARGV[i + JOB.run]                   run index (1-based), 0: no run
-- ARGV[i + JOB.items]                 items in the job
-- ARGV[i + JOB.errors]                items whose result is an error
-- ARGV[i + JOB.results]               the results JSON (the run stream entry)
-- ARGV[i + JOB.started_us]          job started_at in microseconds since the epoch
-- Constants: JOB_PREFIX, EXECUTION_PREFIX, EXECUTION_REGISTRY_PREFIX, RESULT_PREFIX,
-- DEPENDENTS_SUFFIX, DEPENDENCIES_PREFIX, DEPENDENCIES_SUFFIX (key parts taken from RQ's classes),
-- FINISHED, SUCCESSFUL (RQ's job status and result type), ARG, ARG_SIZE, JOB, JOB_SIZE (the layouts
-- above and their sizes).
-- Returns the ids of jobs left to the caller.

--#include queuebert/run_record.lua

local nqueues = tonumber(ARGV[ARG.queues])
local ended_utc, ended_ts, now_ts = ARGV[ARG.ended_at], ARGV[ARG.execution_ended_at], tonumber(ARGV[ARG.now_ts])
local worker, ended_us = ARGV[ARG.worker], tonumber(ARGV[ARG.ended_us])
local run_base = 2 + 2 * nqueues
local runs = {}
local left = {}
local jobs, items, working_us = 0, 0, 0

local function run_keys(r)
  local k = run_base + 4 * (r - 1)
  return {KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]}
end

for i = ARG_SIZE + 1, #ARGV, JOB_SIZE do
  local id, q, eid = ARGV[i + JOB.id], tonumber(ARGV[i + JOB.queue]), ARGV[i + JOB.execution_id]
  local jkey = JOB_PREFIX .. id
  if redis.call('EXISTS', jkey .. DEPENDENTS_SUFFIX) == 1 then
    left[#left + 1] = id
  else
    -- What frees memory comes first: once a script has written, Redis lets it finish even at
    -- maxmemory, so completions still go through (and readers can then free memory) when
    -- producers have filled Redis up.
    local composite = id .. ':' .. eid
    redis.call('DEL', EXECUTION_PREFIX .. composite)
    redis.call('ZREM', KEYS[2 * q + 1], composite)
    redis.call('ZREM', EXECUTION_REGISTRY_PREFIX .. id, eid)
    redis.call('SREM', KEYS[2], composite)
    jobs = jobs + 1
    items = items + tonumber(ARGV[i + JOB.items])
    working_us = working_us + ended_us - tonumber(ARGV[i + JOB.started_us])
    if redis.call('EXISTS', jkey) == 1 then
      local rt = tonumber(ARGV[i + JOB.result_ttl])
      redis.call('HSET', jkey, 'status', FINISHED, 'ended_at', ended_utc)
      local rkey = RESULT_PREFIX .. id
      redis.call('XADD', rkey, 'MAXLEN', '~', '10', '*', 'type', SUCCESSFUL, 'worker_name', worker,
                 'return_value', ARGV[i + JOB.return_value], 'execution_id', eid,
                 'execution_started_at', ARGV[i + JOB.execution_started_at], 'execution_ended_at', ended_ts)
      if rt == -1 then redis.call('PERSIST', rkey) else redis.call('EXPIRE', rkey, rt) end
      local score = now_ts + rt
      if rt < 0 then score = (rt == -1) and '+inf' or rt end
      redis.call('ZADD', KEYS[2 * q + 2], score, id)
      if rt > 0 then
        redis.call('EXPIRE', jkey, rt)
        if ARGV[i + JOB.has_dependencies] == '1' then
          redis.call('EXPIRE', DEPENDENCIES_PREFIX .. id .. DEPENDENCIES_SUFFIX, rt)
        end
      end
      local r = tonumber(ARGV[i + JOB.run])
      if r > 0 then
        local acc = runs[r]
        if acc == nil then
          local run = run_keys(r)
          acc = {run = run, open = run_is_open(run), items = 0, jobs = 0, errors = 0}
          runs[r] = acc
        end
        if acc.open and run_add(acc.run, id, ARGV[i + JOB.results]) then
          acc.items = acc.items + tonumber(ARGV[i + JOB.items])
          acc.jobs = acc.jobs + 1
          acc.errors = acc.errors + tonumber(ARGV[i + JOB.errors])
        end
      end
    end
  end
end

for _, acc in pairs(runs) do
  if acc.jobs > 0 then run_count(acc.run, acc.items, acc.jobs, acc.errors, ARGV[ARG.now]) end
end

if jobs > 0 then
  redis.call('HINCRBY', KEYS[1], 'qb_items', items)
  redis.call('HINCRBY', KEYS[1], 'successful_job_count', jobs)
  redis.call('HINCRBYFLOAT', KEYS[1], 'total_working_time', string.format('%.6f', working_us / 1000000))
end
return left
