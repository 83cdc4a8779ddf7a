--[[ escrow.lua: move capacity of a global limit between its slices, one slice (one slot) per call.

A global limit held in escrow is split into one slice per partition (see docs/design.md); the
slices' capacities never sum to more than the limit. A transfer from a giver slice to a taker
slice is three calls, each atomic on its own slot:

  give     (giver's slot)  capacity -= d, and the transfer is written down in the giver's
                           outgoing hash: from here on d is in flight, counted in no slice;
  take     (taker's slot)  capacity += d, once (a mark with the transfer id), and only while
                           the transfer is younger than its timeout;
  reclaim  (giver's slot)  the transfer leaves the outgoing hash; with received = 0 its d goes
                           back to the giver's capacity.

So the sum of the slices never exceeds the limit, mid-transfer or if quotad dies between two
calls: what dies in flight is lost until any replica's recovery (stale, cancel, reclaim) finds
the transfer older than its timeout, cancels it at the taker (a cancel mark: a late take then
does nothing) and, if the taker never got it, gives it back to the giver.

Slice state, next to the limit's counter key K (which holds usage as for any limit):
  K:e  "<capacity> <limit it was set for> <owed> <owed until>" (no TTL: capacity is state,
       not usage). Absent: the slice holds its even share, floor(limit / slices), plus one
       for the first limit % slices slices. A limit changed in the policy scales every
       capacity by new / old, rounding down: the sum stays within the new limit.
  Fair share between busy slices: a giver can give only what it does not use, and a busy
  one uses all it has. So a giver left with more capacity than its taker owes the taker
  half the difference (at most what the taker asks: the cost it was denied, or its own
  capacity, so a busy taker's ask doubles with each pull), for one period: meanwhile it
  admits up to its capacity less what it owes, and what it owes frees as its usage drains
  or leaves the window, for the taker's next pulls to take. Two busy slices thus converge
  to equal capacities within a period or so; a passing request owes it one request's cost.
  A token bucket slice of capacity c refills at c / period: the slices' rates sum to at most
  the limit's; its level K "<level> <updated_at>" is drained at the old rate and rewritten
  whenever c changes. A sliding window slice admits while its window holds at most c units.

Transfer records: hash '<prefix>:{tag}:e:out' of the giver, field <id>, value
  "<taker index> <d> <limit> <created_us> <alg> <metric> <period> <slices> <key suffix>"
  where the key suffix is K without '<prefix>:{tag}:l:'. Marks: '<prefix>:{tag}:e:in:<id>'
  of the taker, 'r' (received) or 'x' (cancelled), kept ARGV[ttl] ms.

Modes (ARGV[1]); ARGV[2] is now in microseconds, or "" to read Redis TIME.
  give     KEYS: K, out.  ARGV[3..]: alg (B|W), metric, limit, period, index, slices, floor,
           id, taker index, want, key suffix, the taker's capacity (as last seen), ask.
           Gives min(want, free - floor) whole units, free = capacity - usage now (never what
           is in use), and owes the taker half of what it keeps above it, at most `ask`
           (then less what it gives on later calls). Returns {d, now}.
  take     KEYS: K, mark.  ARGV[3..]: alg, metric, limit, period, index, slices, id, d,
           the limit d was given under, created_us, timeout_us, mark ttl ms. Returns {d, now,
           capacity after} ({0, now, capacity}: too late, or already taken or cancelled).
           Capacity that comes to a slice with a waiting line is announced on '<prefix>:wake'
           (take and reclaim), as settle.lua announces freed capacity.
  cancel   KEYS: mark.  ARGV[3]: mark ttl ms. Returns {1} if the taker had received it, else
           {0} (and from now on it never will).
  reclaim  KEYS: K, out.  ARGV[3..]: id, received (0|1), giver index. Returns {d given back}.
  stale    KEYS: out.  ARGV[3]: timeout_us. Returns the {id, record} pairs older than it.
]]

local call, fmt, tonumber = redis.call, string.format, tonumber
local mode = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local t = call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local EPSILON = 1e-9

-- Capacity, and what the slice owes until when ({0, 0} once past).
local function capacity(key, limit, index, slices)
  local raw = call('GET', key .. ':e')
  if raw then
    local c, set_for, owed, owed_until = string.match(raw, '^(%d+) (%d+) ?(%d*) ?(%d*)')
    c, set_for, owed, owed_until = tonumber(c), tonumber(set_for), tonumber(owed) or 0, tonumber(owed_until) or 0
    if owed_until <= now then owed, owed_until = 0, 0 end
    if set_for ~= limit then c, owed = math.floor(c * limit / set_for), math.floor(owed * limit / set_for) end
    return c, owed, owed_until
  end
  local share = math.floor(limit / slices)
  if index < limit % slices then share = share + 1 end
  return share, 0, 0
end

-- Usage now: a bucket's level drained at its capacity's rate, or a window's units.
local function usage(alg, metric, key, c, period)
  if alg == 'B' then
    local raw = call('GET', key)
    if not raw then return 0 end
    local level, updated = string.match(raw, '^(%S+) (%d+)$')
    level = tonumber(level)
    local drained = level - (now - tonumber(updated)) * c / period
    if drained < 0 then drained = 0 elseif drained > level then drained = level end
    return drained
  end
  local floor = fmt('(%d', now - period)
  if metric == 'r' then return call('ZCOUNT', key, floor, '+inf') end
  local used = 0
  for _, member in ipairs(call('ZRANGEBYSCORE', key, floor, '+inf')) do
    used = used + tonumber(string.match(member, ':(%d+)$'))
  end
  return used
end

-- A new capacity (and what it owes); a bucket's level is first drained at the old rate and
-- rewritten at now.
local function set_capacity(alg, metric, key, old, new, limit, period, owed, owed_until)
  if alg == 'B' then
    local level = usage(alg, metric, key, old, period)
    if level <= EPSILON then
      call('DEL', key)
    elseif new > 0 then
      call('SET', key, fmt('%.17g %d', level, now), 'PX', fmt('%d', math.ceil(level * period / new / 1000) + 1000))
    else
      call('SET', key, fmt('%.17g %d', level, now))  -- no rate: it stays until capacity comes
    end
  end
  if owed > 0 then
    call('SET', key .. ':e', fmt('%d %d %d %d', new, limit, math.min(owed, new), owed_until))
  else
    call('SET', key .. ':e', fmt('%d %d', new, limit))
  end
end

-- Capacity came to a slice whose limit has a waiting line: wake its waiters on every replica
-- (as settle.lua does for freed capacity), rather than at their next heartbeat.
local function announce(key)
  local partition = string.match(key, '^(.-:{[^}]*})')
  if call('SISMEMBER', partition .. ':lines', key .. ':q') == 1 then
    call('PUBLISH', string.match(partition, '^(.-):{') .. ':wake', key .. ':q')
  end
end

if mode == 'give' then
  local alg, metric, limit, period = ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
  local index, slices, keep = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
  local c, owed, owed_until = capacity(KEYS[1], limit, index, slices)
  local free = c - usage(alg, metric, KEYS[1], c, period)
  local d = math.max(0, math.floor(math.min(tonumber(ARGV[12]), free - keep)))
  local taker = tonumber(ARGV[14]) + d
  -- Owed: half the difference, at most what the taker asks (one request's cost, or as much as
  -- it has: a busy taker doubles per pull, a passing request does not halve a busy giver).
  local owe = math.min(math.floor((c - d - taker) / 2), tonumber(ARGV[15]))
  if owed > 0 then owed = math.max(0, owed - d) end  -- paid as it gives
  if owe > owed then
    owed, owed_until = owe, now + period
  elseif d == 0 then
    return {0, now}  -- nothing to give, nothing more owed
  end
  set_capacity(alg, metric, KEYS[1], c, c - d, limit, period, owed, owed_until)
  if d > 0 then
    call('HSET', KEYS[2], ARGV[10],
      table.concat({ARGV[11], fmt('%d', d), ARGV[5], fmt('%d', now), alg, metric, ARGV[6], ARGV[8], ARGV[13]}, ' '))
  end
  return {d, now}
elseif mode == 'take' then
  local alg, metric, limit, period = ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
  local index, slices = tonumber(ARGV[7]), tonumber(ARGV[8])
  local d, given_for, created, timeout = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
  local c, owed, owed_until = capacity(KEYS[1], limit, index, slices)
  if now - created > timeout then return {0, now, c} end  -- past its timeout: it goes back to the giver
  if not call('SET', KEYS[2], 'r', 'NX', 'PX', ARGV[14]) then return {0, now, c} end
  if given_for ~= limit then d = math.floor(d * limit / given_for) end
  set_capacity(alg, metric, KEYS[1], c, c + d, limit, period, owed, owed_until)
  announce(KEYS[1])
  return {d, now, c + d}
elseif mode == 'cancel' then
  if call('SET', KEYS[1], 'x', 'NX', 'PX', ARGV[3]) then return {0} end
  if call('GET', KEYS[1]) == 'r' then return {1} end
  return {0}
elseif mode == 'reclaim' then
  local record = call('HGET', KEYS[2], ARGV[3])
  if not record then return {0} end  -- reclaimed already
  call('HDEL', KEYS[2], ARGV[3])
  if ARGV[4] == '1' then return {0} end
  local _, d, limit, _, alg, metric, period, slices = string.match(record,
    '^(%d+) (%d+) (%d+) (%d+) (%a) (%a) (%d+) (%d+) ')
  d, limit, period = tonumber(d), tonumber(limit), tonumber(period)
  local c, owed, owed_until = capacity(KEYS[1], limit, tonumber(ARGV[5]), tonumber(slices))
  set_capacity(alg, metric, KEYS[1], c, c + d, limit, period, owed, owed_until)
  announce(KEYS[1])
  return {d}
elseif mode == 'stale' then
  local found = {}
  local all = call('HGETALL', KEYS[1])
  for j = 1, #all, 2 do
    local created = tonumber(string.match(all[j + 1], '^%d+ %d+ %d+ (%d+) '))
    if now - created > tonumber(ARGV[3]) then
      found[#found + 1] = all[j]
      found[#found + 1] = all[j + 1]
    end
  end
  return found
end
return redis.error_reply('escrow.lua: unknown mode ' .. tostring(mode))
