-- The worker's Redis state (field qb_redis of its worker hash) for `queuebert stats`. EXPIRE first,
-- with the TTL Worker.heartbeat gives the hash: it only re-times, so Redis lets the script go on
-- writing at maxmemory, which is exactly when the state matters.
--
-- KEYS[1] worker hash
-- ARGV[1] state text   ARGV[2] worker hash ttl

if redis.call('EXPIRE', KEYS[1], ARGV[2]) == 1 then
  redis.call('HSET', KEYS[1], 'qb_redis', ARGV[1])
end
return 0
