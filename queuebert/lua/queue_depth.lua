-- Queue depth in items: the work waiting in one RQ queue, and held by workers, counted in texts.
--
-- RQ's queue list holds job ids, and a job carries 1 to 64 texts (more for a big chunk), so its
-- length counts the wrong thing for an autoscaler. Each job hash queuebert enqueues records its
-- item count (ITEM_COUNT_FIELD, keys.JOB_ITEM_COUNT), which never changes: summing it over the ids
-- that are in the lists now is exact at this instant, whatever moved them there (an enqueue, a
-- give-back, RQ's retry of a killed worker's job), with no counter to keep in step.
--
-- Read-only, and bounded: a sum over every queued job would block Redis for ~2 us per job (24 ms
-- at 10,000 jobs of RQ's size, 206 ms at 100,000, on the 2-core dev machine). The first ARG.scan jobs from the head (the
-- oldest, which also give the oldest age) are read one by one; the items of the rest are estimated
-- from ARG.sample jobs spread evenly over it, and the reply says so. A run that drains is counted
-- exactly from the moment fewer than ARG.scan jobs are left: the part that decides scaling to zero.
--
-- KEYS[1] queue list   KEYS[2] its intermediate list (RQ: jobs a worker blocked for work moved
--                      there, on their way to the started registry)   KEYS[3] started registry
-- ARGV[ARG.scan]    jobs counted one by one (from the head of the queue; of the started registry)
-- ARGV[ARG.sample]  jobs sampled to estimate the items of the rest
-- Constants: JOB_PREFIX (RQ's job hash prefix), ITEM_COUNT_FIELD.
--
-- Returns {waiting_jobs, waiting_items, waiting_estimated (0|1), oldest_enqueued_at ('' when none),
--          started_jobs, started_items, started_estimated (0|1)}. Waiting counts the queue and the
-- intermediate list; started counts jobs registered to a worker (also one that died, until its
-- jobs are recovered, which puts them back in the queue and so in waiting). A job whose hash is
-- gone (expired or deleted while queued) is no work and is not counted.

local scan = tonumber(ARGV[ARG.scan])
local sample = tonumber(ARGV[ARG.sample])

-- Items of a job and when it was enqueued (RQ's fixed-width UTC string, so strings compare as
-- times); nil when its hash is gone. A job without the field (enqueued through RQ's own API) is one item.
local function job(id)
  local f = redis.call('HMGET', JOB_PREFIX .. id, ITEM_COUNT_FIELD, 'enqueued_at', 'status')
  if not f[1] and not f[2] and not f[3] then return nil end
  return tonumber(f[1]) or 1, f[2]
end

-- Count `ids` exactly; returns jobs, items and the oldest enqueued_at seen (or the one given).
local function exact(ids, strip, oldest)
  local jobs, items = 0, 0
  for _, id in ipairs(ids) do
    if strip then id = string.match(id, '^(.*):[^:]*$') or id end
    local n, at = job(id)
    if n then
      jobs = jobs + 1
      items = items + n
      if at and (not oldest or at < oldest) then oldest = at end
    end
  end
  return jobs, items, oldest
end

-- The items of `rest` members after the first `scan` of a list or sorted set, from `sample`
-- members spread over them (the mean of the exact part when sample is 0). The positions follow
-- the golden ratio rather than a fixed step, which a periodic pattern of job sizes could alias.
local function estimate(key, is_list, rest, strip, exact_jobs, exact_items)
  local k = math.min(sample, rest)
  local seen, items = 0, 0
  for i = 0, k - 1 do
    local at = scan + math.floor(((i * 0.6180339887498949) % 1) * rest)
    local id
    if is_list then
      id = redis.call('LINDEX', key, at)
    else
      id = redis.call('ZRANGE', key, at, at)[1]
    end
    if id then
      if strip then id = string.match(id, '^(.*):[^:]*$') or id end
      local n = job(id)
      if n then
        seen = seen + 1
        items = items + n
      end
    end
  end
  if seen == 0 then seen, items = exact_jobs, exact_items end
  if seen == 0 then return rest end
  return math.floor(items * rest / seen + 0.5)
end

local in_transit_jobs, in_transit_items, oldest = exact(redis.call('LRANGE', KEYS[2], 0, -1), false, false)
local length = redis.call('LLEN', KEYS[1])
local head_jobs, head_items
head_jobs, head_items, oldest = exact(redis.call('LRANGE', KEYS[1], 0, scan - 1), false, oldest)
local waiting_jobs, waiting_items, waiting_estimated = in_transit_jobs + head_jobs, in_transit_items + head_items, 0
if length > scan then
  waiting_estimated = 1
  waiting_jobs = waiting_jobs + length - scan
  waiting_items = waiting_items + estimate(KEYS[1], true, length - scan, false, head_jobs, head_items)
end

local started = redis.call('ZCARD', KEYS[3])
local held_jobs, held_items = exact(redis.call('ZRANGE', KEYS[3], 0, scan - 1), true, false)
local started_jobs, started_items, started_estimated = held_jobs, held_items, 0
if started > scan then
  started_estimated = 1
  started_jobs = held_jobs + started - scan
  started_items = held_items + estimate(KEYS[3], false, started - scan, true, held_jobs, held_items)
end

return {waiting_jobs, waiting_items, waiting_estimated, oldest or '', started_jobs, started_items, started_estimated}
