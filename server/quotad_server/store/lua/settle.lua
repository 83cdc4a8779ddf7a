--[[ settle.lua: Commit (reconcile with actual usage) or Release (refund everything).

Why one script: the record's state change and the adjustment of every limit the
reservation touched must happen together and exactly once, however often a
caller retries; and a Commit racing a Release must see one winner.

The limits come from the reservation record (see reserve.lua), not the current
policy: a reservation is settled on the limits it was made under. Their keys
are rebuilt from KEYS[1]'s '<prefix>:{tag}' part, so they share its hash tag and
live on its Redis Cluster slot.

KEYS[1]  the reservation record "<prefix>:{tag}:r:<reservation id>"

ARGV[1]  mode: "commit" or "release"
ARGV[2]  now in microseconds, or "" to read Redis TIME
ARGV[3]  deadline in Redis-clock microseconds (see reserve.lua); 0 = none
ARGV[4]  actual input tokens (commit)
ARGV[5]  actual output tokens (commit)
ARGV[6]  TTL of the settled record in milliseconds (so retries still see the first result)

Per limit, delta = actual units - reserved units (release: actual is zero):
  b  level += delta after draining, never below 0 (a refund cannot create credit;
     a charge above capacity is debt that later requests wait out)
  w  the member "<id>:<units>" becomes "<id>:<actual>" at its original time while it is
     in the window; past the window, a charge above the estimate is added at now
  c  the reservation leaves the in-flight set

The settled record shrinks to "<c|x> <actual_in> <actual_out> <lease_expired> <est_in>
<est_out> <lease_expires_at>": enough to answer retries and idempotent replays.

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

local record = redis.call('GET', KEYS[1])
if not record then
  return {0, 0, 0, 0, 0, 0, ''}
end
local target = 'c'
if mode == 'release' then target = 'x' end
local state = string.sub(record, 1, 1)
if state ~= 'r' then
  local ain, aout, lease_expired, ein, eout = string.match(record, '^%a (%d+) (%d+) (%d) (%d+) (%d+)')
  local code = 2
  if state ~= target then code = -3 end
  return {code, tonumber(ein), tonumber(eout), tonumber(ain), tonumber(aout), tonumber(lease_expired), state}
end

local function int(x) return string.format('%d', x) end
local EPSILON = 1e-9
local function ceil(x) return math.ceil(x - EPSILON) end

local act_in, act_out, act_requests = tonumber(ARGV[4]), tonumber(ARGV[5]), 1
if mode == 'release' then act_in, act_out, act_requests = 0, 0, 0 end

local function units(metric, requests, input, output)
  if metric == 'r' then return requests end
  if metric == 'i' then return input end
  if metric == 'o' then return output end
  return input + output
end

local base, rid = string.match(KEYS[1], '^(.*):r:(%x+)$')
base = base .. ':l:'
local lines = string.gmatch(record, '[^\n]+')
local lease_expires, est_in, est_out = string.match(lines(), '^r (%d+) (%d+) (%d+)$')
lease_expires, est_in, est_out = tonumber(lease_expires), tonumber(est_in), tonumber(est_out)

for line in lines do
  local alg, metric, limit, period, suffix = string.match(line, '^(%a) (%a) (%d+) (%d+) (.+)$')
  local key = base .. suffix
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
        local stored, updated = string.match(raw, '^(%S+) (%d+)$')
        level = tonumber(stored)
        if now > tonumber(updated) then
          level = math.max(0, level - (now - tonumber(updated)) * limit / period)
        end
      end
      level = level + delta
      if level <= EPSILON then
        redis.call('DEL', key)
      else
        redis.call('SET', key, string.format('%.17g %d', level, now), 'PX', ceil(level * period / limit / 1000) + 1000)
      end
    elseif delta ~= 0 and alg == 'w' then
      local member = rid .. ':' .. int(reserved)
      local at = redis.call('ZSCORE', key, member)
      local counted = metric ~= 'r'  -- windows over tokens keep a running sum
      if at and tonumber(at) > now - period then
        redis.call('ZREM', key, member)
        if reserved + delta > 0 then redis.call('ZADD', key, at, rid .. ':' .. int(reserved + delta)) end
        if counted then redis.call('INCRBY', key .. ':sum', int(delta)) end
      elseif delta > 0 then
        local ttl = ceil(period / 1000) + 1000
        redis.call('ZADD', key, now, rid .. '+:' .. int(delta))
        redis.call('PEXPIRE', key, ttl)
        if counted then
          redis.call('INCRBY', key .. ':sum', int(delta))
          redis.call('PEXPIRE', key .. ':sum', ttl)
        end
      end
    end
  end
end

local lease_expired = 0
if now > lease_expires then lease_expired = 1 end
redis.call('SET', KEYS[1], table.concat({target, int(act_in), int(act_out), lease_expired, int(est_in), int(est_out),
  int(lease_expires)}, ' '), 'PX', tonumber(ARGV[6]))
return {1, est_in, est_out, act_in, act_out, lease_expired, target}
