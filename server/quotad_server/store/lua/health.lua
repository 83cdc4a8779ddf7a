--[[ health.lua: can Redis make decisions now? The probe behind quotad's health check.

Why a script that writes, not PING: PING and TIME can answer while no decision can be
made, and health would say SERVING while every decision fails: TIME is served while a
restarted Redis loads its dataset (and Valkey serves PING then too), and neither is refused
by a read-only replica after a failover, a Redis out of memory, or one that refuses writes
after a failed snapshot. This script is refused in exactly those states, as reserve.lua is.

KEYS[1]  the probe's key "<prefix>:{health}:probe" (one for every replica; overwritten)
ARGV[1]  its TTL in milliseconds

Returns Redis TIME {seconds, microseconds}: a sample of Redis's clock for the replica.
]]

local now = redis.call('TIME')
redis.call('SET', KEYS[1], now[1], 'PX', tonumber(ARGV[1]))
return now
