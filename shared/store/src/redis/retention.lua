-- retention: ARGV[2] operation, [3] key or hash, [4] before ms.
-- Cache entries and artifacts have their last write time in the zsets
-- P:cache_written (member = cache key) and P:artifact_written (member =
-- hash); an entry is deleted only if that time is before ARGV[4], so a
-- writer that just stored it again keeps it. Reply: {'ok', '1' | '0'}.
local op, key, before = ARGV[2], ARGV[3], tonumber(ARGV[4])
local zset, data
if op == 'cache' then
  zset, data = P .. ':cache_written', P .. ':cache:' .. key
elseif op == 'artifact' then
  zset, data = P .. ':artifact_written', P .. ':artifact:' .. key
else
  return redis.error_reply('unknown retention operation ' .. op)
end
local written = tonumber(redis.call('ZSCORE', zset, key))
if not written or written >= before then return {'ok', '0'} end
redis.call('ZREM', zset, key)
return {'ok', tostring(redis.call('DEL', data))}
