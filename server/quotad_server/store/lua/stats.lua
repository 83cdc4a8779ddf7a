--[[ stats.lua: add one committed call to the usage statistics of its model and tier.

Why a script: the increments and the decay must not interleave with another replica's,
or a halving could lose a sample. Statistics live under their own hash tag, apart from
the limits, so this is a separate call after the Commit; they steer estimates and never
decide admission.

KEYS[1]  the statistics hash of one (model, tier), see usage_stats.py for its fields
ARGV[1]  window: when the sample count reaches twice this, every field is halved
ARGV[2..] field, increment pairs

Returns the sample count after the update.
]]

for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
local n = tonumber(redis.call('HGET', KEYS[1], 'n'))
if n >= 2 * tonumber(ARGV[1]) then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    local halved = math.floor(tonumber(all[i + 1]) / 2)
    if halved > 0 then
      redis.call('HSET', KEYS[1], all[i], halved)
    else
      redis.call('HDEL', KEYS[1], all[i])
    end
  end
  n = math.floor(n / 2)
end
redis.call('PEXPIRE', KEYS[1], 30 * 86400000)  -- a model nobody calls for a month starts afresh
return n
