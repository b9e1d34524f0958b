-- The run record of one finished job (see run_record.lua), for the paths that finish jobs one at a
-- time: worker.tasks.classify under a stock RQ worker, the failure callback, and the jobs the
-- batching worker completes with RQ's own handlers.
--
-- KEYS: the run's keys in queuebert.keys.run_keys order (meta hash, done-jobs set, stream, jobs list)
-- ARGV[ARG.job]      job id
-- ARGV[ARG.items]    items in the job           ARGV[ARG.errors]  items whose result is an error
-- ARGV[ARG.results]  the results JSON           ARGV[ARG.now]     time of completion ("%.3f" seconds)
-- Returns 1 if the job was recorded, 0 if it already was (or the run is consumed).

--#include queuebert/run_record.lua

local run = {KEYS[1], KEYS[2], KEYS[3], KEYS[4]}
if not run_is_open(run) or not run_add(run, ARGV[ARG.job], ARGV[ARG.results]) then
  return 0
end
run_count(run, tonumber(ARGV[ARG.items]), 1, tonumber(ARGV[ARG.errors]), ARGV[ARG.now])
return 1
