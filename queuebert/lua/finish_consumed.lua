-- The end of a consuming read: the run's stream, job list and done-jobs set go; its meta hash stays
-- (small, until its TTL, for `stats --all-runs`) marked `consumed`, which the run record checks
-- (run_record.lua), so a late completion never reopens the run. The DEL comes first: once a script
-- has written, Redis lets it finish even at maxmemory, which is when readers free memory.
--
-- KEYS: the run's keys in queuebert.keys.run_keys order (meta hash, done-jobs set, stream, jobs list)

redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'consumed', 1)
end
return 0
