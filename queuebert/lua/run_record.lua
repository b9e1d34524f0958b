-- The run record of a finished job: its entry in the run's stream and the run's counters. Every
-- script that completes jobs includes this file (queuebert/lua/complete_job.lua for one job,
-- worker/lua/complete.lua for many at once), so there is one rule for all of them:
--
-- - a job's entry and counts are written once per job id, however often the job completes (a job
--   redelivered after its worker died runs twice): the done-jobs set is the guard;
-- - nothing is written into a run whose consuming reader has finished with it (`consumed` in its
--   meta hash): that would bring back what the reader read and deleted;
-- - the run's keys then live the run's `ttl` (a meta field: the producer's result TTL, written at
--   enqueue), or DEFAULT_RUN_TTL for a run whose meta names none (jobs of another producer).
--
-- A run's keys, in queuebert.keys.run_keys order, as a table: {meta, done-jobs set, stream, jobs list}.
-- Constant: DEFAULT_RUN_TTL (queuebert.settings.DEFAULT_RESULT_TTL).

local RUN_META, RUN_DONE, RUN_STREAM, RUN_JOBS = 1, 2, 3, 4

local function run_is_open(run)
  return redis.call('HEXISTS', run[RUN_META], 'consumed') == 0
end

-- The stream entry of `job_id` (its results JSON), unless it has one. True if it was added.
local function run_add(run, job_id, results)
  if redis.call('SADD', run[RUN_DONE], job_id) == 0 then return false end
  redis.call('XADD', run[RUN_STREAM], '*', 'job', job_id, 'results', results)
  return true
end

-- Counts what run_add added (items, jobs, item errors), at `now` ("%.3f" seconds), and re-times the
-- run's keys. Callers that add many jobs of one run count them once.
local function run_count(run, items, jobs, errors, now)
  redis.call('HINCRBY', run[RUN_META], 'done', items)
  redis.call('HINCRBY', run[RUN_META], 'done_jobs', jobs)
  if errors > 0 then redis.call('HINCRBY', run[RUN_META], 'errors', errors) end
  redis.call('HSET', run[RUN_META], 'updated_at', now)
  local ttl = tonumber(redis.call('HGET', run[RUN_META], 'ttl')) or DEFAULT_RUN_TTL
  if ttl > 0 then
    for _, key in ipairs(run) do redis.call('EXPIRE', key, ttl) end
  end
end
