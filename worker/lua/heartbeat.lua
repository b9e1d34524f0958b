-- Heartbeat: what RQ's Execution.heartbeat writes for each running job, for all of them in one call
-- (a worker can hold thousands of one-text jobs; redis-py would pack 5 commands for each).
--
-- KEYS: the started registry of each queue (1-based, in the store's queue order)
-- ARGV[ARG.beat]    last_heartbeat (float timestamp)
-- ARGV[ARG.ttl]     execution ttl (seconds)
-- ARGV[ARG.now_ts]  rq.utils.current_timestamp() (integer seconds, for registry scores)
-- then per job, at i, i + JOB_SIZE, ...: ARGV[i + JOB.id] job id, ARGV[i + JOB.execution_id]
-- execution id, ARGV[i + JOB.queue] queue index (1-based)
-- Constants: EXECUTION_PREFIX, EXECUTION_REGISTRY_PREFIX (from RQ's classes), ARG, ARG_SIZE, JOB,
-- JOB_SIZE (the layouts above).

local beat, ttl, now_ts = ARGV[ARG.beat], tonumber(ARGV[ARG.ttl]), tonumber(ARGV[ARG.now_ts])
for i = ARG_SIZE + 1, #ARGV, JOB_SIZE do
  local id, eid = ARGV[i + JOB.id], ARGV[i + JOB.execution_id]
  local composite = id .. ':' .. eid
  local ekey = EXECUTION_PREFIX .. composite
  -- EXPIRE first: it only re-times (so Redis lets the script go on writing at maxmemory), and an
  -- execution that has already expired is not brought back as a partial hash.
  if redis.call('EXPIRE', ekey, ttl) == 1 then
    redis.call('HSET', ekey, 'last_heartbeat', beat)
    redis.call('ZADD', KEYS[tonumber(ARGV[i + JOB.queue])], 'XX', now_ts + ttl, composite)
    local rkey = EXECUTION_REGISTRY_PREFIX .. id
    redis.call('ZADD', rkey, 'XX', now_ts + ttl + 60, eid)
    redis.call('EXPIRE', rkey, ttl + 60)
  end
end
return 0
