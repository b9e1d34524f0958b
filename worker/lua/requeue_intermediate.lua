-- Requeue a job a dead worker left in RQ's intermediate list: back at the front of its queue, but
-- only if it is still there (a take script that moved it on meanwhile leaves nothing to requeue,
-- so the job is never queued twice).
--
-- KEYS[1] the queue's intermediate list   KEYS[2] the queue list
-- ARGV[1] job id
-- Returns 1 if the job went back, else 0.

if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
