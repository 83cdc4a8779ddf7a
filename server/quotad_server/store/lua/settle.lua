--[[ settle.lua: Commit (reconcile with actual usage), Release (refund everything), or undo.

Why one script: the record's state change and the adjustment of every limit the
reservation touched must happen together and exactly once, however often a
caller retries; and a Commit racing a Release must see one winner.

The limits and prices come from the reservation record (see reserve.lua), not the
current policy: a reservation is settled on the terms it was made under. Their
keys are rebuilt from KEYS[1]'s '<prefix>:{tag}' part, so they share its hash tag
and live on its Redis Cluster slot.

KEYS[1]  the reservation record "<prefix>:{tag}:r:<reservation id>"
KEYS[2]  undo only: the reservation's idempotency key (KEYS[1] again when it had none)

ARGV[1]  mode: "commit", "release" or "undo"
ARGV[2]  now in microseconds, or "" to read Redis TIME
ARGV[3]  deadline in Redis-clock microseconds (see reserve.lua); 0 = none
ARGV[4]  actual input tokens (commit), cache reads included; undo: the claims the reply showed
ARGV[5]  actual output tokens (commit)
ARGV[6]  actual input tokens read from the prompt cache (commit), <= ARGV[4]
ARGV[7]  TTL of the settled record in milliseconds (so retries still see the first result)
ARGV[8]  the tenants whose reservations the caller may settle, tab-separated, or "*" for any:
         another tenant's reservation is refused (code -4) before anything is read out or written
ARGV[9]  actual input tokens written to the prompt cache (commit), <= ARGV[4] - ARGV[6];
         absent: 0

The actual cost, in whole micro-dollars, is computed here with the record's prices P
(micro-dollars per million tokens) exactly as Price.cost_micro_usd computes estimates:
  round_half_even(((input - cached - written) * P_in + cached * P_cached
                   + written * P_write + output * P_out) / 10^6)
using integer arithmetic that stays exact in Lua's doubles (every term below 2^53). The
record's prices are "<P_in> <P_cached> <P_out>", optionally followed by "<P_write>
<threshold>" and then by "<P_in> <P_cached> <P_out> <P_write>" again: a call whose input is above a non-zero threshold pays the second set
on every token (long-context prices); without P_write, writes pay P_in.

Per limit, delta = actual units - reserved units (release: actual is zero):
  b    level += delta after draining, never below 0 (a refund cannot create credit;
       a charge above capacity is debt that later requests wait out)
  w    the member "<id>:<units>" becomes "<id>:<actual>" at its original time while it is
       in the window; past the window, a charge above the estimate is added at now. Request
       windows sharing a zset (see reserve.lua) share the member: the first removes it.
  c    the reservation leaves the in-flight set
  d/m  the period the reservation was charged to takes the difference (never below 0)
  B/W  as b and w, on the slice the reservation was charged to (its key is in the record, in
       this partition): refunds go back to that slice. A bucket slice drains at its capacity's
       rate (K:e, see escrow.lua; absent, floor(limit / slices), which drains no faster than
       its real share). Records written before escrow existed have no B or W lines.

Undo: a Release that quotad runs by itself when Redis answered a reservation after quotad had
told the caller UNAVAILABLE (the reply came too late: a paused Redis, a slow network). Nobody
holds that reservation, so it is refunded, and its idempotency key is forgotten so that the
caller's retry decides afresh. Unless a retry handed it out since (the record's claims, see
reserve.lua, are past those the late reply showed): then a caller holds it, and it stays.
Code 1: undone; 2: left as it was. One atomic step: an undo and a retry racing on two
replicas never both win.

Capacity freed on a limit that has a waiting line (see reserve.lua) is announced on the
channel '<prefix>:wake' with the line's key, so replicas wake their waiters at once
instead of polling.

The settled record shrinks to "<c|x> <actual_in> <actual_out> <lease_expired> <est_in>
<est_out> <lease_expires_at> <est_cost> <actual_cost> <actual_cached> <actual_written>" and
the "<model>\t<tier>\t<tenant>[\t<max_output>]" line: enough to answer retries and
idempotent replays.

Returns {code, est_in, est_out, actual_in, actual_out, lease_expired, state, est_cost,
  actual_cost, actual_cached, "<model>\t<tier>\t<tenant>[\t<max_output>]", actual_written}
  code 1 settled now, 2 already settled this way (first result returned, nothing changed),
  0 no such reservation, -1 past the deadline (nothing written),
  -3 settled the other way (commit after release or release after commit; state says which),
  -4 another tenant's reservation (nothing read out, nothing written)
]]

local mode = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local deadline = tonumber(ARGV[3])
if deadline > 0 and now > deadline then
  return {-1, 0, 0, 0, 0, 0, '', 0, 0, 0, ''}
end

local record = redis.call('GET', KEYS[1])
if not record then
  return {0, 0, 0, 0, 0, 0, '', 0, 0, 0, ''}
end
local target = 'c'
if mode ~= 'commit' then target = 'x' end
local lines = string.gmatch(record, '[^\n]+')
local head, meta = lines(), lines()
if ARGV[8] ~= '*' then  -- a record from before tenants were recorded has none: only '*' settles it
  local tenant = string.match(meta, '^[^\t]*\t[^\t]*\t([^\t]*)') or ''
  if not string.find('\t' .. ARGV[8] .. '\t', '\t' .. tenant .. '\t', 1, true) then
    return {-4, 0, 0, 0, 0, 0, '', 0, 0, 0, ''}
  end
end
local state, claims = string.match(head, '^(%a)(%d*)')
if mode == 'undo' and (state ~= 'r' or (tonumber(claims) or 0) ~= tonumber(ARGV[4])) then
  return {2, 0, 0, 0, 0, 0, state, 0, 0, 0, meta}
end
if state ~= 'r' then
  local ain, aout, lease_expired, ein, eout, _, ecost, acost, acached, awritten =
    string.match(head, '^%a (%d+) (%d+) (%d) (%d+) (%d+) (%d+) (%d+) (%d+) (%d+) ?(%d*)$')
  local code = 2
  if state ~= target then code = -3 end
  return {code, tonumber(ein), tonumber(eout), tonumber(ain), tonumber(aout), tonumber(lease_expired), state,
    tonumber(ecost), tonumber(acost), tonumber(acached), meta, tonumber(awritten) or 0}
end

local function int(x) return string.format('%d', x) end
local EPSILON = 1e-9
local function ceil(x) return math.ceil(x - EPSILON) end

local lease_expires, est_in, est_out, est_cost, prices =
  string.match(head, '^r%d* (%d+) (%d+) (%d+) (%d+) ([%d ]+)$')
lease_expires, est_in, est_out, est_cost = tonumber(lease_expires), tonumber(est_in), tonumber(est_out), tonumber(est_cost)
local p = {}
for rate in string.gmatch(prices, '%d+') do p[#p + 1] = tonumber(rate) end

local act_in, act_out, act_cached, act_requests = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), 1
local act_written = tonumber(ARGV[9]) or 0
if mode ~= 'commit' then act_in, act_out, act_cached, act_requests, act_written = 0, 0, 0, 0, 0 end

local M = 1000000
local function cost_of(input, cached, written, output)
  local at = 0
  if (p[5] or 0) > 0 and p[9] and input > p[5] then at = 5 end  -- above the long-context threshold
  local whole, fraction = 0, 0
  local terms = {{input - cached - written, p[at + 1]}, {cached, p[at + 2]}, {output, p[at + 3]},
    {written, p[at + 4] or p[at + 1]}}
  for _, term in ipairs(terms) do
    local high = math.floor(term[1] / M)
    whole = whole + high * term[2]
    fraction = fraction + (term[1] - high * M) * term[2]
  end
  local q = math.floor(fraction / M)
  local r = fraction - q * M
  if 2 * r > M or (2 * r == M and (whole + q) % 2 == 1) then q = q + 1 end  -- half to even
  return whole + q
end
local act_cost = 0
if mode == 'commit' then act_cost = cost_of(act_in, act_cached, act_written, act_out) end

local function units(metric, requests, input, output, cached, cost)
  if metric == 'r' then return requests end
  if metric == 'i' then return input end
  if metric == 'I' then return input - cached end
  if metric == 'o' then return output end
  if metric == 'u' then return cost end
  if metric == 'T' then return input - cached + output end
  return input + output
end

local partition, rid = string.match(KEYS[1], '^(.*):r:(%x+)$')
local base = partition .. ':l:'
local freed = {}

for line in lines do
  local alg, metric, limit, period, suffix = string.match(line, '^(%a) (%a) (%d+) (%d+) (.+)$')
  local key = base .. suffix
  limit, period = tonumber(limit), tonumber(period)
  if alg == 'W' then
    alg = 'w'
  elseif alg == 'B' then  -- a slice: its capacity is its rate (see escrow.lua)
    alg = 'b'
    local raw = redis.call('GET', key .. ':e')
    if raw then
      local c, set_for = string.match(raw, '^(%d+) (%d+)')
      limit = math.floor(tonumber(c) * limit / tonumber(set_for))
    else
      limit = math.floor(limit / tonumber(string.match(suffix, '^g:B(%d+):') or '1'))
    end
  end
  if alg == 'c' then
    if redis.call('ZREM', key, rid) == 1 then freed[#freed + 1], freed[key] = key, true end
  else
    local reserved = units(metric, 1, est_in, est_out, 0, est_cost)
    local delta = units(metric, act_requests, act_in, act_out, act_cached, act_cost) - reserved
    if delta < 0 and not freed[key] then freed[#freed + 1], freed[key] = key, true end
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
      elseif limit > 0 then
        redis.call('SET', key, string.format('%.17g %d', level, now), 'PX', ceil(level * period / limit / 1000) + 1000)
      else  -- a slice with no capacity has no rate: its debt stays until capacity comes (escrow.lua)
        redis.call('SET', key, string.format('%.17g %d', level, now))
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
    elseif delta ~= 0 then  -- 'd', 'm': the period charged at reservation (its first day is `period`)
      local period_key = key .. ':' .. int(period)
      local used = redis.call('INCRBY', period_key, int(delta))
      if used <= 0 then
        redis.call('DEL', period_key)
      elseif redis.call('PTTL', period_key) < 0 then  -- the period had ended and gone: keep the debt a day
        redis.call('PEXPIRE', period_key, 86400000)
      end
    end
  end
end

if #freed > 0 and redis.call('EXISTS', partition .. ':lines') == 1 then
  local channel = string.match(partition, '^(.-):{') .. ':wake'
  for _, key in ipairs(freed) do
    if redis.call('SISMEMBER', partition .. ':lines', key .. ':q') == 1 then
      redis.call('PUBLISH', channel, key .. ':q')
    end
  end
end

if mode == 'undo' and KEYS[2] ~= KEYS[1] then  -- forget the key, if it still names this reservation
  local seen = redis.call('GET', KEYS[2])
  if seen and string.sub(seen, -#KEYS[1] - 1) == '\n' .. KEYS[1] then redis.call('DEL', KEYS[2]) end
end
local lease_expired = 0
if now > lease_expires then lease_expired = 1 end
redis.call('SET', KEYS[1], table.concat({target, int(act_in), int(act_out), lease_expired, int(est_in), int(est_out),
  int(lease_expires), int(est_cost), int(act_cost), int(act_cached), int(act_written)}, ' ') .. '\n' .. meta, 'PX',
  tonumber(ARGV[7]))
return {1, est_in, est_out, act_in, act_out, lease_expired, target, est_cost, act_cost, act_cached, meta, act_written}
