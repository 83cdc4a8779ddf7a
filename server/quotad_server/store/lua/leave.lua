--[[ leave.lua: give up a place in a waiting line (the waiter's deadline passed or it was cancelled).

Why a script: the place, the ticket and the registry of non-empty lines change together,
so no other decision sees a half-removed waiter.

KEYS[1]  the ticket "<prefix>:{tag}:w:<ticket>" (its value is the line it waits in)
ARGV[1]  the ticket id

Returns 1 when a place was given up, 0 when there was none.
]]

local line = redis.call('GET', KEYS[1])
if not line then return 0 end
redis.call('ZREM', line, ARGV[1])
redis.call('DEL', KEYS[1])
if redis.call('ZCARD', line) == 0 then
  redis.call('SREM', string.match(KEYS[1], '^(.*):w:[^:]*$') .. ':lines', line)
end
return 1
