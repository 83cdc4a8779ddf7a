--[[ settle.lua: Commit (reconcile with actual usage) or Release (refund everything).

Why one script: the record's state change and the adjustment of every limit the
reservation touched must happen together and exactly once, however often a
caller retries; and a Commit racing a Release must see one winner.

The limits come from the reservation record, not the current policy: a
reservation is settled on the limits it was made under. Their keys share
KEYS[1]'s hash tag (they were built for the same partition), so they live on
its Redis Cluster slot.

KEYS[1]  the reservation record (hash, written by reserve.lua)

ARGV[1]  mode: "commit" or "release"
ARGV[2]  now in microseconds, or "" to read Redis TIME
ARGV[3]  deadline in Redis-clock microseconds (see reserve.lua); 0 = none
ARGV[4]  actual input tokens (commit)
ARGV[5]  actual output tokens (commit)
ARGV[6]  TTL of the settled record in milliseconds (so retries still see the first result)

Per limit, delta = actual units - reserved units (release: actual is zero):
  b  level += delta after draining, never below 0 (a refund cannot create credit;
     a charge above capacity is debt that later requests wait out)
  w  the member "<id>:<units>" becomes "<id>:<actual>" at its original time when it is
     still in the window; past the window, a charge above the estimate is added at now
  c  the reservation leaves the in-flight set

Returns {code, est_in, est_out, actual_in, actual_out, lease_expired, state}
  code 1 settled now, 2 already settled this way (first result returned, nothing changed),
  0 no such reservation, -1 past the deadline (nothing written),
  -3 settled the other way (commit after release or release after commit; state says which)
]]

local mode = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local deadline = tonumber(ARGV[3])
if deadline > 0 and now > deadline then
  return {-1, 0, 0, 0, 0, 0, ''}
end

local record = redis.call('HMGET', KEYS[1], 'id', 'st', 'lx', 'ein', 'eout', 'ain', 'aout', 'lxp', 'k', 's')
if not record[1] then
  return {0, 0, 0, 0, 0, 0, ''}
end
local rid, state, lease_expires = record[1], record[2], tonumber(record[3])
local est_in, est_out = tonumber(record[4]), tonumber(record[5])
local target = 'c'
if mode == 'release' then target = 'x' end
if state ~= 'r' then
  local code = 2
  if state ~= target then code = -3 end
  return {code, est_in, est_out, tonumber(record[6]), tonumber(record[7]), tonumber(record[8]), state}
end

local act_in, act_out, act_requests = tonumber(ARGV[4]), tonumber(ARGV[5]), 1
if mode == 'release' then act_in, act_out, act_requests = 0, 0, 0 end

local function units(metric, requests, input, output)
  if metric == 'r' then return requests end
  if metric == 'i' then return input end
  if metric == 'o' then return output end
  return input + output
end

local EPSILON = 1e-9
local function ceil(x) return math.ceil(x - EPSILON) end

local keys, specs = {}, {}
for key in string.gmatch(record[9], '[^\n]+') do keys[#keys + 1] = key end
for spec in string.gmatch(record[10], '[^\n]+') do specs[#specs + 1] = spec end

for i = 1, #keys do
  local key = keys[i]
  local alg, metric, limit, period = string.match(specs[i], '^(%a) (%a) (%d+) (%d+)$')
  limit, period = tonumber(limit), tonumber(period)
  if alg == 'c' then
    redis.call('ZREM', key, rid)
  else
    local reserved = units(metric, 1, est_in, est_out)
    local delta = units(metric, act_requests, act_in, act_out) - reserved
    if delta ~= 0 and alg == 'b' then
      local level = 0
      local raw = redis.call('GET', key)
      if raw then
        local sep = string.find(raw, ' ', 1, true)
        level = tonumber(string.sub(raw, 1, sep - 1))
        local updated = tonumber(string.sub(raw, sep + 1))
        if now > updated then level = math.max(0, level - (now - updated) * limit / period) end
      end
      level = level + delta
      if level <= EPSILON then
        redis.call('DEL', key)
      else
        redis.call('SET', key, string.format('%.17g %d', level, now), 'PX', ceil(level * period / limit / 1000) + 1000)
      end
    elseif delta ~= 0 and alg == 'w' then
      local member = rid .. ':' .. reserved
      local at = redis.call('ZSCORE', key, member)
      local ttl = ceil(period / 1000) + 1000
      if at and tonumber(at) > now - period then
        redis.call('ZREM', key, member)
        if reserved + delta > 0 then redis.call('ZADD', key, at, rid .. ':' .. (reserved + delta)) end
        redis.call('INCRBY', key .. ':sum', delta)
      elseif delta > 0 then
        redis.call('ZADD', key, now, rid .. '+:' .. delta)
        redis.call('INCRBY', key .. ':sum', delta)
        redis.call('PEXPIRE', key, ttl)
        redis.call('PEXPIRE', key .. ':sum', ttl)
      end
    end
  end
end

local lease_expired = 0
if now > lease_expires then lease_expired = 1 end
redis.call('HSET', KEYS[1], 'st', target, 'ain', act_in, 'aout', act_out, 'lxp', lease_expired)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[6]))
return {1, est_in, est_out, act_in, act_out, lease_expired, target}
