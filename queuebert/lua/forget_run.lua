-- A run nobody will read again (every handle of it released: producer.async_client.AsyncClient.release):
-- its keys go, and its meta hash is left as a tombstone of one field, `consumed`, which the run record
-- checks (run_record.lua), so a late completion (a job redelivered after its worker stalled) never
-- brings the run back. One script, so no completion lands between the DEL and the tombstone; the DEL
-- comes first, as in finish_consumed.lua, so it runs even at maxmemory.
--
-- KEYS: the run's keys in queuebert.keys.run_keys order (meta hash, done-jobs set, stream, jobs list),
--       then its cursor
-- ARGV[1]: seconds the tombstone lives (the producer's result TTL)

redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('HSET', KEYS[1], 'consumed', 1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 0
