--[[ reserve.lua: decide one request against every limit that applies to it.

Why one script: the check and the debit of every limit must be one atomic step,
or concurrent callers over-admit (check-then-act), and a request denied by one
limit must not be charged on the others. All or nothing, and a denial writes
nothing at all.

KEYS[1]   the reservation record this request would create (a string, see below)
KEYS[2]   the idempotency key (string "<fingerprint>\n<record key>"); unused when ARGV[7] is ""
KEYS[3..] one counter key per limit, in the order of the limit specs in ARGV. Derived keys
          share its hash tag (so the Redis Cluster slot): a sliding window over tokens keeps
          its running sum at KEYS[i] .. ':sum', a calendar budget its period's usage at
          KEYS[i] .. ':' .. <first day of the period, in days since 1970-01-01>.

ARGV[1]   mode: "reserve", or "peek" (compute the statuses at zero cost, write nothing)
ARGV[2]   now in microseconds, or "" to read Redis TIME (the clock of every replica)
ARGV[3]   deadline in Redis-clock microseconds: past it the caller has given up, so the
          script writes nothing and returns -1; 0 = no deadline
ARGV[4]   reservation id
ARGV[5]   lease in microseconds
ARGV[6]   record TTL in milliseconds (lease + retention)
ARGV[7]   idempotency fingerprint, "" for none
ARGV[8]   estimated input tokens
ARGV[9]   estimated output tokens
ARGV[10]  estimated cost in micro-dollars
ARGV[11]  prices in micro-dollars per million tokens, kept in the record as sent for settle.lua
          (which reads them): "<input> <cached input> <output> <cache write> <threshold>", then
          "<input> <cached input> <output> <cache write>" again when threshold > 0 (the
          prices of a call whose input is above it)
ARGV[12]  "<model>\t<tier>\t<tenant>\t<max_output>", kept in the record: the model and tier for
          usage statistics, the tenant the caller acted for to check who may settle it, the
          call's max_output_tokens to flag impossible usage and bucket the statistics
ARGV[13]  the waiting line: "<ticket> <boost> <enqueue> <max line> <ticket ttl ms>" (see below),
          then " <slice index> <slices>" when some limit is a slice (escrow, see escrow.lua)
ARGV[14]  N, the number of limits; then 5 values per limit:
          algorithm (b token bucket, w sliding window, c concurrency, d calendar day,
            m calendar month; B and W: this partition's slice of a token bucket or a sliding
            window held in escrow, see escrow.lua),
          metric (r requests, c concurrent, i input tokens, I input tokens less cache reads,
            o output tokens, t total tokens, T total tokens less cache reads, u micro-dollars),
          limit (units), period (microseconds; 0 for concurrency and calendar budgets),
          admission cap (units): how much of the limit this request's priority may fill;
            the limit itself, or less to keep headroom for higher priorities
ARGV[15 + 5N]  optional: how each limit decides, one character per limit (absent: all '0'):
          '0' enforced: a limit the cost does not fit denies the request;
          '1' shadow: evaluated, never denies; charged when the cost fits, left uncharged (and
            out of the record) when it would have denied, so its counter holds what enforcing
            it would have admitted; its status still says wait > 0;
          '2' forced: never denies and is always charged, over the limit if need be (debt):
            for usage already spent, such as tokens reported after the response

State, per algorithm (units are requests, tokens or micro-dollars; times are microseconds):
  b  string "<level> <updated_at>": units in use; it drains at limit/period. A level
     above the limit is debt (usage above estimates), which later requests wait out.
  w  zset of "<reservation id>:<units>" scored by reservation time; members at or before
     now - period are outside the window. Over requests every member is one unit, so the
     zset's count is the usage; otherwise KEYS[i]:sum holds the units of all members.
     Request windows that count the same requests (same owner, same model filter) share
     one zset, each counting its own span of it: a subject's 10/minute and 100/hour cost
     one member, one ZADD and one PEXPIRE per request, and the zset keeps the longest span.
  c  zset of reservation ids scored by lease expiry; members at or before now are expired.
  d/m  integer units used in the current UTC day / month.
  B/W  as b and w, with the slice's capacity c (KEYS[i] .. ':e', see escrow.lua) in place of
     the limit: a bucket slice refills at c/period, a window slice holds at most c units, and
     the admission cap is cap * (c - owed) / limit, rounded down (owed: what the slice yields
     to busier slices, see escrow.lua). A cost above the slice but within
     the limit waits one period at most (every slice empties within a period, and a
     rebalance can then move its capacity); it never waits -1 (that says: never fits).
     Each slice keeps a zset of its own (no sharing between request windows).

Waiting lines. A request denied with enqueue=1 takes a place (its ticket) in the line of
its binding limit: zset KEYS[b] .. ':q' scored by rank = arrival time - boost, where the
boost grows with priority (so higher priorities go first, FIFO within a priority, and a
waiter ages past newer arrivals of higher priority after a bounded time). The replicas
order their own waiters by the same rank (the reply carries it). A ticket is live while
'<prefix>:{tag}:w:<ticket>' exists; its value is "<line>\n<cost> <cap> <ready>": its cost
and admission cap on the line's limit, and 1 if nothing but that limit held it back at its
last try. The waiting replica refreshes it, so a dead replica's places expire; zset
KEYS[b] .. ':qx' holds each place's expiry, so dead places are dropped before a line's
length is compared with its bound. A waiter admitted from a line that still holds others
announces it on '<prefix>:wake' (settle.lua does the same for freed capacity, leave.lua
for a place given up), so the next in line tries at once. '<prefix>:{tag}:lines' is the
set of non-empty lines.

Order without head-of-line blocking: on a limit with a line, the live waiters ranked before
a request claim capacity first, in rank order, each one that fits (its cost within its own
cap, with the claims before it) and is ready; a waiter that cannot fit (capped by its
priority, say) or is held back by another of its limits claims nothing and holds nobody
back. The request takes what is left, or waits (wait = HINT). At most SCAN waiters are
looked at; a fresh request's rank is now - boost, a waiter's its ticket's score.

The record (string, TTL = lease + retention) is what settle.lua needs, so a reservation
is settled on the limits and prices it was made under even if the policy changes:
  "r<claims> <lease_expires_at> <est_in> <est_out> <est_cost> <prices as in ARGV[11]>"
  where <claims> counts the idempotent retries that handed the reservation out again
  ("" for none): an undo (see settle.lua) names the count it saw.
  "<model>\t<tier>\t<tenant>\t<max_output>"
  then one line per limit: "<algorithm> <metric> <limit> <period> <key suffix>", where the
  key suffix is the key without '<prefix>:{tag}:l:' and, for a calendar budget, period is
  the first day of the period it was charged to.

Returns {code, now, lease_expires_at, N, (remaining, reset_after, wait) * N, line}
  line: the index of the limit whose line the ticket waits in (0: none); when it waits,
  then its rank in that line and 1 if capacity is left on that limit that others may fit
  (the replica then lets its next waiter try: this one cannot use it).
  code 1 allowed, 0 denied, 3 denied because the line is full, 2 replayed: {2, now, lease_expires_at, 0, reservation id,
  est. input, est. output, est. cost, claims} (the first reservation, no limit evaluated; claims: its
  hand-outs so far, -1 once settled),
  -1 past the deadline (nothing written), -2 idempotency key reused for another request.
  wait is 0 when the cost fits now, -1 when it never can, else microseconds until it fits.
]]

-- Cost notes (measured with bench/redis_cost.py): Redis turns every Lua number passed to
-- redis.call into a string with "%.17g", and Lua turns a number concatenated into a string
-- with "%.14g"; both cost more than the command on a hot key. So numbers go to Redis as
-- strings made once ('%d'), and the ARGV strings are passed on as they came.
local call, fmt, tonumber = redis.call, string.format, tonumber
local mode = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local t = call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local now_s = fmt('%d', now)
local deadline = tonumber(ARGV[3])
if deadline > 0 and now > deadline then
  return {-1, now, 0, 0}
end
local peek = mode == 'peek'
local rid = ARGV[4]
local lease_us = tonumber(ARGV[5])
local fingerprint = ARGV[7]
local est_in, est_out, est_cost = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local n = tonumber(ARGV[14])
local limit_modes = ARGV[15 + n * 5] or ''
local function enforced(i) local m = string.sub(limit_modes, i, i) return m == '' or m == '0' end
local skip = {}  -- the shadow limits this request is not charged to
local ticket, boost, enqueue, max_line, ticket_ttl, slice_index, slices =
  string.match(ARGV[13], '^(%S+) (%d+) (%d) (%d+) (%d+) ?(%d*) ?(%d*)$')
slice_index, slices = tonumber(slice_index) or 0, tonumber(slices) or 1
local partition = string.sub(KEYS[1], 1, -#rid - 4)  -- KEYS[1] is '<prefix>:{tag}' .. ':r:' .. rid
local registry = partition .. ':lines'
local function ticket_key(id) return partition .. ':w:' .. id end

-- Idempotent retry: hand back the first reservation and change nothing.
if not peek and fingerprint ~= '' then
  local seen = call('GET', KEYS[2])
  if seen then
    local sep = string.find(seen, '\n', 1, true)
    if string.sub(seen, 1, sep - 1) ~= fingerprint then return {-2, now, 0, 0} end
    local record_key = string.sub(seen, sep + 1)
    local record = call('GET', record_key)
    if record then
      local first_id = string.match(record_key, ':r:(%x+)$')
      local state, claims, rest = string.match(record, '^(%a)(%d*)( .*)$')
      local lx, ein, eout, ecost
      if state == 'r' then
        -- Handed out once more: count it, so that an undo of an earlier hand-out leaves it be.
        claims = (tonumber(claims) or 0) + 1
        call('SET', record_key, 'r' .. claims .. rest, 'KEEPTTL')
        lx, ein, eout, ecost = string.match(rest, '^ (%d+) (%d+) (%d+) (%d+)')
      else  -- settled: "<state> <ain> <aout> <lease_expired> <ein> <eout> <lx> <ecost> ..."
        claims = -1
        ein, eout, lx, ecost = string.match(rest, '^ %d+ %d+ %d (%d+) (%d+) (%d+) (%d+)')
      end
      return {2, now, tonumber(lx), 0, first_id, tonumber(ein), tonumber(eout), tonumber(ecost), claims}
    end
  end
end

-- What this request costs on each metric (see ARGV[14]).
local units = {r = 1, c = 1, i = est_in, I = est_in, o = est_out, u = est_cost, t = est_in + est_out,
  T = est_in + est_out}
if peek then units = {} end

-- Lua's own number-to-string conversion keeps 14 digits; microsecond times need 16.
local function int(x) return fmt('%d', x) end

-- Draining is continuous, so a bucket level is fractional; float noise must neither deny
-- a request that fits nor round a wait up by a microsecond. Far below one unit.
local EPSILON = 1e-9
local function ceil(x) return math.ceil(x - EPSILON) end

-- Calendar periods in UTC, from days since 1970-01-01 (H. Hinnant's civil-date algorithms).
local DAY = 86400000000
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
local function days_from_civil(y, m)  -- the first of month m
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5)
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end
-- The current period of a calendar budget: its first day, and when it ends (microseconds).
local function calendar_period(alg)
  local day = math.floor(now / DAY)
  if alg == 'd' then return day, (day + 1) * DAY end
  local y, m = civil_from_days(day)
  local first = days_from_civil(y, m)
  if m == 12 then y, m = y + 1, 1 else m = m + 1 end
  return first, days_from_civil(y, m) * DAY
end

-- Waiting lines on this request's limits, and this request's rank against them.
local lined, my_rank, my_line = {}, now - tonumber(boost), nil
if not peek and call('EXISTS', registry) == 1 then
  local lines = {}
  for i = 1, n do lines[i] = KEYS[i + 2] .. ':q' end
  local present = call('SMISMEMBER', registry, unpack(lines))
  for i = 1, n do lined[i] = present[i] == 1 end
  if ticket ~= '-' then
    local place = call('GET', ticket_key(ticket))
    if place then
      my_line = string.match(place, '^[^\n]*')
      my_rank = tonumber(call('ZSCORE', my_line, ticket) or my_rank)
    end
  end
end
local SCAN = 16
-- The capacity that the live waiters ranked before this request claim on a line (see the
-- header), with `used` in use; the places of waiters that are gone are dropped on the way.
local function claimed_before(line, used, limit)
  local claim, dropped = 0, false
  local members = call('ZRANGE', line, 0, SCAN - 1, 'WITHSCORES')
  for j = 1, #members, 2 do
    local id, rank = members[j], tonumber(members[j + 1])
    if id == ticket or rank > my_rank or (rank == my_rank and id > ticket) then break end
    local place = call('GET', ticket_key(id))
    if not place then
      call('ZREM', line, id)
      call('ZREM', line .. 'x', id)
      dropped = true
    else
      local cost, cap, ready = string.match(place, '\n(%S+) (%S+) (%d)$')
      cost, cap = tonumber(cost), tonumber(cap)
      if ready == '1' and used + claim + cost - cap <= EPSILON then claim = claim + cost end
      if used + claim >= limit then break end  -- nothing is left to claim
    end
  end
  if dropped and call('ZCARD', line) == 0 then call('SREM', registry, line) end
  return claim
end
local HINT = tonumber(ticket_ttl) * 1000 / 3  -- about one heartbeat, for those a line holds back

-- A slice's capacity, and what it owes other slices until then (see escrow.lua, which writes
-- them): absent, its even share of the limit, owing nothing.
local function slice_capacity(key, limit)
  local raw = call('GET', key .. ':e')
  if raw then
    local c, set_for, owed, owed_until = string.match(raw, '^(%d+) (%d+) ?(%d*) ?(%d*)')
    c, set_for = tonumber(c), tonumber(set_for)
    owed = (tonumber(owed_until) or 0) > now and tonumber(owed) or 0
    if set_for ~= limit then c, owed = math.floor(c * limit / set_for), math.floor(owed * limit / set_for) end
    return c, math.min(owed, c)
  end
  local share = math.floor(limit / slices)
  if slice_index < limit % slices then share = share + 1 end
  return share, 0
end

local statuses = {}
local span = {}  -- per request-window key, the longest period counted on it
local admit = true
for i = 1, n do
  local base = 14 + (i - 1) * 5
  local alg, metric = ARGV[base + 1], ARGV[base + 2]
  local limit, period, cap = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5])
  local key = KEYS[i + 2]
  local cost = units[metric] or 0
  local used, wait, reset_after, extra, claim = 0, 0, 0, 0, 0
  local whole = cap  -- the limit's own cap: a cost above it never fits
  if alg == 'B' or alg == 'W' then
    local c, owed = slice_capacity(key, limit)
    cap = math.floor(cap * (c - owed) / limit)  -- it drains at c's rate, and admits up to c less what it owes
    limit = c
    if alg == 'B' then alg = 'b' else alg = 'w' end
  end
  if alg == 'b' then
    local raw = call('GET', key)
    if raw then
      local level, updated = string.match(raw, '^(%S+) (%d+)$')
      used = tonumber(level) - (now - tonumber(updated)) * limit / period
      if used < 0 then used = 0 elseif used > tonumber(level) then used = tonumber(level) end
    end
    if cost > whole then
      wait = -1
    elseif cost > cap or (used + cost - cap > EPSILON and limit <= 0) then
      wait = period  -- a slice too small for it: see B/W above
    elseif used + cost - cap > EPSILON then
      wait = ceil((used + cost - cap) * period / limit)
    end
    local after = used
    if wait == 0 then after = used + cost end
    if limit > 0 then reset_after = ceil(after * period / limit) elseif after > 0 then reset_after = period end
  elseif alg == 'w' then
    local floor = now - period
    if metric == 'r' then
      used = call('ZCOUNT', key, fmt('(%d', floor), '+inf')
    else
      local total = tonumber(call('GET', key .. ':sum') or '0')
      local gone = call('ZRANGEBYSCORE', key, '-inf', int(floor))
      for j = 1, #gone do extra = extra + tonumber(string.match(gone[j], ':(%d+)$')) end
      used = total - extra
    end
    if cost > whole then
      wait = -1
    elseif cost > cap then
      wait = period  -- a slice too small for it: see B/W above
    elseif used + cost > cap then
      -- The oldest members leave the window first: find the one whose exit makes room.
      if metric == 'r' then
        local nth = call('ZRANGEBYSCORE', key, '(' .. int(floor), '+inf', 'WITHSCORES', 'LIMIT', used + cost - cap - 1, 1)
        wait = tonumber(nth[2]) + period - now
      else
        local members = call('ZRANGEBYSCORE', key, '(' .. int(floor), '+inf', 'WITHSCORES')
        local left = used
        for j = 1, #members, 2 do
          left = left - tonumber(string.match(members[j], ':(%d+)$'))
          if left + cost <= cap then
            wait = tonumber(members[j + 1]) + period - now
            break
          end
        end
      end
    end
    if wait == 0 and cost > 0 then
      reset_after = period  -- this request's own member is the newest
    elseif used > 0 then
      local newest = call('ZRANGE', key, -1, -1, 'WITHSCORES')
      reset_after = math.max(0, tonumber(newest[2]) + period - now)
    end
  elseif alg == 'c' then
    used = call('ZCOUNT', key, '(' .. int(now), '+inf')
    if cost > cap then
      wait = -1
    elseif used + cost > cap then
      local nth = call('ZRANGEBYSCORE', key, '(' .. int(now), '+inf', 'WITHSCORES', 'LIMIT', used + cost - cap - 1, 1)
      wait = tonumber(nth[2]) - now
    end
    if used > 0 then
      local last = call('ZRANGE', key, -1, -1, 'WITHSCORES')
      reset_after = math.max(0, tonumber(last[2]) - now)
    end
    if wait == 0 and cost > 0 then reset_after = math.max(reset_after, lease_us) end
  else -- 'd', 'm': calendar budgets
    local first_day, ends = calendar_period(alg)
    extra = first_day
    used = tonumber(call('GET', key .. ':' .. int(first_day)) or '0')
    reset_after = ends - now
    if cost > cap then
      wait = -1
    elseif used + cost > cap then
      wait = ends - now
    end
  end
  if wait == 0 and lined[i] then
    claim = claimed_before(key .. ':q', used, limit)
    if used + claim + cost - cap > EPSILON then
      wait = HINT  -- capacity is there, but waiters ranked before this request take it first
    end
  end
  if wait ~= 0 then
    if enforced(i) then admit = false elseif string.sub(limit_modes, i, i) == '1' then skip[i] = true end
  end
  if alg == 'w' and metric == 'r' and period > (span[key] or 0) then span[key] = period end
  statuses[i] = {alg, metric, limit, period, key, cost, used, wait, reset_after, extra, cap, claim}
end

local lease_expires = now + lease_us
local reply = {1, now, lease_expires, n}
for i = 1, n do
  local s = statuses[i]
  local remaining = s[11] - s[7] - s[12]  -- what this request's priority may still fill
  if admit and not skip[i] then remaining = remaining - s[6] end
  reply[#reply + 1] = math.floor(remaining)
  reply[#reply + 1] = s[9]
  reply[#reply + 1] = s[8]
end

if peek then return reply end
if not admit then
  reply[1] = 0
  reply[#reply + 1] = 0
  local never = false
  local binding, longest = 0, -1
  for i = 1, n do
    if enforced(i) then
      if statuses[i][8] < 0 then never = true end
      if statuses[i][8] > longest then binding, longest = i, statuses[i][8] end
    end
  end
  if enqueue == '1' and not never then
    -- Wait in the binding limit's line; a ticket already in a line keeps its place.
    local line = my_line or (KEYS[binding + 2] .. ':q')
    local expiry, ttl = line .. 'x', tonumber(ticket_ttl)
    if not my_line then
      -- Only live places count: drop those whose waiters stopped renewing them.
      local dead = call('ZRANGEBYSCORE', expiry, '-inf', int(now), 'LIMIT', 0, 1000)
      if #dead > 0 then
        call('ZREM', line, unpack(dead))
        call('ZREM', expiry, unpack(dead))
      end
      if call('ZCARD', line) >= tonumber(max_line) then
        reply[1] = 3
        return reply
      end
      call('ZADD', line, my_rank, ticket)
      call('SADD', registry, line)
    end
    -- What this place claims on its line's limit, and whether only that limit held it back.
    local at, place = 0, '0 0 0'
    for i = 1, n do
      if KEYS[i + 2] .. ':q' == line then at = i end
    end
    if at > 0 then
      local ready = 1
      for i = 1, n do
        if i ~= at and statuses[i][8] ~= 0 and enforced(i) then ready = 0 end
      end
      local s = statuses[at]
      place = string.format('%.17g %.17g %d', s[6], s[11], ready)
    end
    call('SET', ticket_key(ticket), line .. '\n' .. place, 'PX', ttl)
    call('ZADD', expiry, now + ttl * 1000, ticket)
    -- Lines and the registry outlive their last live waiter by a ticket's life, then go by themselves.
    for _, k in ipairs({line, expiry, registry}) do call('PEXPIRE', k, 2 * ttl) end
    reply[#reply] = at
    reply[#reply + 1] = my_rank
    local spare = 0
    if at > 0 and statuses[at][3] - statuses[at][7] - statuses[at][12] > EPSILON then spare = 1 end
    reply[#reply + 1] = spare
  end
  return reply
end
if my_line then  -- admitted: leave the line, and let the next in line know its turn may have come
  call('ZREM', my_line, ticket)
  call('ZREM', my_line .. 'x', ticket)
  call('DEL', ticket_key(ticket))
  if call('ZCARD', my_line) == 0 then
    call('SREM', registry, my_line)
  else
    call('PUBLISH', string.match(partition, '^(.-):{') .. ':wake', my_line)
  end
end
reply[#reply + 1] = 0

local prefix_len = #partition + 3  -- '<prefix>:{tag}' .. ':l:'
-- Expired members of a request window or an in-flight set never count (every read is by
-- score), so removing them only bounds memory. Doing it on one admission in 16, chosen by
-- the random reservation id, keeps at most ~16 of them beyond the live ones and saves a
-- call on the others. (Windows over tokens must trim to keep their running sum exact.)
local trim = string.sub(rid, -1) == '0'
local record = {
  'r ' .. int(lease_expires) .. ' ' .. ARGV[8] .. ' ' .. ARGV[9] .. ' ' .. ARGV[10] .. ' ' .. ARGV[11],  -- integers as sent
  ARGV[12],
}
for i = 1, n do
  local s = statuses[i]
  if skip[i] then s[6] = 0 end  -- a shadow limit it would have denied: neither charged nor recorded
  local alg, limit, period, key, cost = s[1], s[3], s[4], s[5], s[6]
  local base = 14 + (i - 1) * 5
  local recorded_period = ARGV[base + 4]  -- as sent: already an integer string
  if alg == 'b' then
    if cost > 0 then
      local level = s[7] + cost
      call('SET', key, fmt('%.17g %s', level, now_s), 'PX', fmt('%d', ceil(level * period / limit / 1000) + 1000))
    end
  elseif alg == 'w' then
    if s[2] == 'r' then
      if cost > 0 and span[key] then  -- the first of the windows sharing this zset writes for all
        local longest = span[key]
        span[key] = nil
        if trim then call('ZREMRANGEBYSCORE', key, '-inf', int(now - longest)) end
        call('ZADD', key, now_s, rid .. ':1')
        call('PEXPIRE', key, fmt('%d', ceil(longest / 1000) + 1000))
      end
    elseif cost > 0 then
      local ttl = fmt('%d', ceil(period / 1000) + 1000)
      call('ZREMRANGEBYSCORE', key, '-inf', int(now - period))
      call('SET', key .. ':sum', int(s[7] + cost), 'PX', ttl)
      call('ZADD', key, now_s, rid .. ':' .. int(cost))
      call('PEXPIRE', key, ttl)
    end
  elseif alg == 'c' then
    if trim then call('ZREMRANGEBYSCORE', key, '-inf', int(now)) end
    if not skip[i] then call('ZADD', key, int(lease_expires), rid) end
    -- The key must outlive every lease in it: only ever lengthen its TTL while any is live.
    local ttl = fmt('%d', ceil(lease_us / 1000) + 1000)
    if s[7] > 0 then call('PEXPIRE', key, ttl, 'GT') else call('PEXPIRE', key, ttl) end
  else
    recorded_period = int(s[10])  -- the first day of the period charged
    if cost > 0 then
      local period_key = key .. ':' .. int(s[10])
      call('INCRBY', period_key, int(cost))
      -- Kept a day past the period's end: a call made in it is settled in it.
      call('PEXPIRE', period_key, fmt('%d', ceil(s[9] / 1000) + 86400000))
    end
  end
  if not skip[i] then
    record[#record + 1] = ARGV[base + 1] .. ' ' .. s[2] .. ' ' .. ARGV[base + 3] .. ' ' .. recorded_period .. ' ' .. string.sub(key, prefix_len + 1)
  end
end

call('SET', KEYS[1], table.concat(record, '\n'), 'PX', ARGV[6])
if fingerprint ~= '' then
  call('SET', KEYS[2], fingerprint .. '\n' .. KEYS[1], 'PX', ARGV[6])
end
return reply
