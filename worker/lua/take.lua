-- Take: pop job ids and register each as started, as RQ's Execution.create +
-- job.prepare_for_execution (+ PERSIST of a job hash with an RQ ttl) + the worker's heartbeat and
-- BUSY state would, for up to ARG.want jobs in one call.
--
-- KEYS[1]  worker hash                KEYS[2]  worker executions set
-- for queue q (1-based), at k = 3q:  KEYS[k] queue list, KEYS[k+1] intermediate list,
--                                     KEYS[k+2] started registry
-- ARGV[ARG.want]         most jobs to register, `first` included
-- ARGV[ARG.ttl]          execution ttl (seconds)
-- ARGV[ARG.worker]       worker name
-- ARGV[ARG.created_at]   execution created_at = last_heartbeat (float timestamp, as Execution.serialize writes it)
-- ARGV[ARG.now_utc]      now as rq.utils.utcformat (job started_at/last_heartbeat, worker last_heartbeat)
-- ARGV[ARG.now_ts]       rq.utils.current_timestamp() (integer seconds, for registry scores)
-- ARGV[ARG.worker_ttl]   worker key/executions set ttl (worker_ttl + 60, what Worker.heartbeat sets)
-- ARGV[ARG.take_id]      execution id prefix (24 hex); the n-th job registered (from 0) gets take_id .. %08x(n)
-- ARGV[ARG.first_queue]  queue index (1-based) of `first`, 0 if none
-- ARGV[ARG.first_id]     its id (already BLMOVEd into that queue's intermediate list by the caller)
-- Constants: JOB_PREFIX, EXECUTION_PREFIX, EXECUTION_REGISTRY_PREFIX (key prefixes taken from RQ's
-- classes), STARTED, BUSY (RQ's job status and worker state), RQ_FEATURE_FIELDS (job hash fields
-- that mark a job as using an RQ feature the fast path leaves to RQ's handlers:
-- worker.rq_completion.RQ_FEATURES), TAKEN (the layout of a taken job in the reply).
--
-- Returns {taken, gone, left}. taken: per registered job the fields of TAKEN, in its order
-- (queue index, id, data, enqueued_at, result_ttl, dependency_ids, dependency_id, execution id,
-- rq_features: the non-empty fields of RQ_FEATURE_FIELDS, comma-separated, or nil);
-- gone: queue index, id per job whose hash no longer exists (or holds no data): nothing is written
-- for those; left: jobs still queued in these queues afterwards.
--
-- Idempotent: ARG.take_id is fresh per call and is recorded in the worker hash (field qb_take). A
-- call that finds its own take id there is a redelivery (redis-py re-sends a command whose reply
-- was lost): it registers nothing and answers with the jobs the first delivery registered, found by
-- their execution ids in the worker's executions set, so no job is left started for a worker that
-- does not know it holds it.

local want = tonumber(ARGV[ARG.want])
local ttl = tonumber(ARGV[ARG.ttl])
local worker, created, utc = ARGV[ARG.worker], ARGV[ARG.created_at], ARGV[ARG.now_utc]
local now_ts = tonumber(ARGV[ARG.now_ts])
local take_id = ARGV[ARG.take_id]
local nqueues = (#KEYS - 2) / 3
local started_score = now_ts + ttl
if ttl < 0 then started_score = (ttl == -1) and '+inf' or ttl end
local taken, gone = {}, {}
local n, seen = 0, 0

-- Reads the job hash; nil if it holds no data (expired or deleted while queued). Otherwise adds the
-- job to the reply, with the RQ features it uses that the fast path leaves to RQ's handlers (their
-- marker fields, comma-separated, or false), and returns its `ttl` field.
local function reply(q, id, eid)
  local f = redis.call('HMGET', JOB_PREFIX .. id, 'data', 'enqueued_at', 'result_ttl', 'dependency_ids',
                       'dependency_id', 'ttl', unpack(RQ_FEATURE_FIELDS))
  if not f[1] then return nil end
  local features = false
  for k, field in ipairs(RQ_FEATURE_FIELDS) do
    local value = f[6 + k]
    if value and value ~= '' then features = features and (features .. ',' .. field) or field end
  end
  local t = #taken
  taken[t + TAKEN.queue] = q
  taken[t + TAKEN.id] = id
  taken[t + TAKEN.data] = f[1]
  taken[t + TAKEN.enqueued_at] = f[2]
  taken[t + TAKEN.result_ttl] = f[3]
  taken[t + TAKEN.dependency_ids] = f[4]
  taken[t + TAKEN.dependency_id] = f[5]
  taken[t + TAKEN.execution_id] = eid
  taken[t + TAKEN.rq_features] = features
  return f[6] or ''
end

local function register(q, id)
  local eid = string.format('%s%08x', take_id, n)
  local job_ttl = reply(q, id, eid)
  if not job_ttl then
    gone[#gone + 1] = q
    gone[#gone + 1] = id
    return
  end
  n = n + 1
  local composite = id .. ':' .. eid
  local ekey = EXECUTION_PREFIX .. composite
  redis.call('HSET', ekey, 'id', eid, 'job_id', id, 'created_at', created, 'last_heartbeat', created,
             'worker_name', worker)
  redis.call('EXPIRE', ekey, ttl)
  local rkey = EXECUTION_REGISTRY_PREFIX .. id
  redis.call('ZADD', rkey, now_ts + ttl + 60, eid)
  redis.call('EXPIRE', rkey, ttl + 60)
  redis.call('ZADD', KEYS[3 * q + 2], started_score, composite)
  redis.call('SADD', KEYS[2], composite)
  local jkey = JOB_PREFIX .. id
  redis.call('HSET', jkey, 'last_heartbeat', utc, 'status', STARTED, 'started_at', utc, 'worker_name', worker)
  if job_ttl ~= '' and tonumber(job_ttl) ~= 0 then
    redis.call('PERSIST', jkey)  -- a queued job's hash may expire; a started one must not
  end
end

local function left_queued()
  local left = 0
  for q = 1, nqueues do left = left + redis.call('LLEN', KEYS[3 * q]) end
  return left
end

if redis.call('HGET', KEYS[1], 'qb_take') == take_id then
  local mine = {}
  local plen = #take_id
  for _, composite in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    local id, eid = string.match(composite, '^(.*):([^:]*)$')
    if eid and string.sub(eid, 1, plen) == take_id then mine[#mine + 1] = {eid, id, composite} end
  end
  table.sort(mine, function(a, b) return a[1] < b[1] end)
  for _, m in ipairs(mine) do
    local q = 0
    for i = 1, nqueues do
      if redis.call('ZSCORE', KEYS[3 * i + 2], m[3]) then q = i break end
    end
    if q > 0 then reply(q, m[2], m[1]) end
  end
  return {taken, gone, left_queued()}
end

local fq = tonumber(ARGV[ARG.first_queue])
if fq > 0 then
  redis.call('LREM', KEYS[3 * fq + 1], 1, ARGV[ARG.first_id])
  seen = 1
  register(fq, ARGV[ARG.first_id])
end
for q = 1, nqueues do
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
  redis.call('EXPIRE', KEYS[1], ARGV[ARG.worker_ttl])
  redis.call('EXPIRE', KEYS[2], ARGV[ARG.worker_ttl])
  redis.call('HSET', KEYS[1], 'state', BUSY, 'qb_take', take_id)
end
return {taken, gone, left_queued()}
