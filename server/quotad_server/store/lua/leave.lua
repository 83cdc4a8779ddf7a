--[[ leave.lua: give up a place in a waiting line (the waiter's deadline passed or it was cancelled).

Why a script: the place, its expiry, the ticket and the registry of non-empty lines change
together, so no other decision sees a half-removed waiter.

KEYS[1]  the ticket "<prefix>:{tag}:w:<ticket>" (its value: "<line>\n<cost> <cap> <ready>",
         see reserve.lua)
ARGV[1]  the ticket id

A place that claimed capacity ahead of others (see reserve.lua) holds them back no more:
the line is announced on '<prefix>:wake', as freed capacity is, so its next waiter tries at
once instead of at its next heartbeat.

Returns 1 when a place was given up, 0 when there was none.
]]

local place = redis.call('GET', KEYS[1])
if not place then return 0 end
local line = string.match(place, '^[^\n]*')
redis.call('ZREM', line, ARGV[1])
redis.call('ZREM', line .. 'x', ARGV[1])
redis.call('DEL', KEYS[1])
local partition = string.match(KEYS[1], '^(.*):w:[^:]*$')
if redis.call('ZCARD', line) == 0 then
  redis.call('SREM', partition .. ':lines', line)
else
  redis.call('PUBLISH', string.match(partition, '^(.-):{') .. ':wake', line)
end
return 1
