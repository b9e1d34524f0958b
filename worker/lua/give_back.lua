-- Give back: jobs taken but not finished return to the front of their queue, as if never taken
-- (Execution.delete + Job.set_status(QUEUED) + LPUSH), but only while this worker still holds them:
-- a job that RQ's maintenance already requeued, or that another worker finished and a reader
-- consumed, is left alone, so a give-back never queues a job twice or writes a job hash without TTL.
--
-- KEYS[1] worker executions set; for queue q (1-based), at k = 2q: KEYS[k] queue list,
--         KEYS[k+1] started registry
-- ARGV, per job at i = 1, 1 + JOB_SIZE, ...: ARGV[i + JOB.id] job id, ARGV[i + JOB.execution_id]
-- execution id, ARGV[i + JOB.queue] queue index (1-based)
-- Constants: EXECUTION_PREFIX, EXECUTION_REGISTRY_PREFIX, JOB_PREFIX (from RQ's classes), QUEUED
-- (RQ's job status), JOB, JOB_SIZE (the layout above).
-- Returns the number of jobs given back.

local given = 0
for i = 1, #ARGV, JOB_SIZE do
  local id, eid, q = ARGV[i + JOB.id], ARGV[i + JOB.execution_id], tonumber(ARGV[i + JOB.queue])
  local composite = id .. ':' .. eid
  local held = redis.call('ZREM', KEYS[2 * q + 1], composite) == 1
  redis.call('DEL', EXECUTION_PREFIX .. composite)
  redis.call('ZREM', EXECUTION_REGISTRY_PREFIX .. id, eid)
  redis.call('SREM', KEYS[1], composite)
  local jkey = JOB_PREFIX .. id
  if held and redis.call('EXISTS', jkey) == 1 then
    redis.call('HSET', jkey, 'status', QUEUED)
    redis.call('LPUSH', KEYS[2 * q], id)
    given = given + 1
  end
end
return given
