-- kv: ARGV[2] operation, [3] collection, [4] key, [5] value, [6] now ms,
-- [7] expiry ms or ''.
-- A collection is the hash P:kv:<collection>; keys with a TTL also have
-- their expiry (ms) in the zset P:kvexp:<collection>. A key whose expiry
-- is <= now is deleted by the next operation that looks at it (kv_list
-- prunes the whole collection), so expired records are never returned.
local op, coll, key, value, now, expires = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local hk = P .. ':kv:' .. coll
local ek = P .. ':kvexp:' .. coll

local function prune(k)
  local exp = redis.call('ZSCORE', ek, k)
  if exp and tonumber(exp) <= tonumber(now) then
    redis.call('HDEL', hk, k)
    redis.call('ZREM', ek, k)
  end
end

if op == 'put' then
  redis.call('HSET', hk, key, value)
  if expires ~= '' then
    redis.call('ZADD', ek, expires, key)
  else
    redis.call('ZREM', ek, key)
  end
  return {'ok'}
elseif op == 'put_new' then
  prune(key)
  if redis.call('HSETNX', hk, key, value) == 1 then return {'ok', '1'} end
  return {'ok', '0'}
elseif op == 'get' then
  prune(key)
  local v = redis.call('HGET', hk, key)
  if v then return {'ok', v} end
  return {'ok'}
elseif op == 'delete' then
  prune(key)
  redis.call('ZREM', ek, key)
  return {'ok', tostring(redis.call('HDEL', hk, key))}
elseif op == 'delete_if' then
  prune(key)
  if redis.call('HGET', hk, key) ~= value then return {'ok', '0'} end
  redis.call('ZREM', ek, key)
  return {'ok', tostring(redis.call('HDEL', hk, key))}
elseif op == 'list' then
  for _, k in ipairs(redis.call('ZRANGEBYSCORE', ek, '-inf', now)) do
    redis.call('HDEL', hk, k)
  end
  redis.call('ZREMRANGEBYSCORE', ek, '-inf', now)
  local out = redis.call('HGETALL', hk)
  table.insert(out, 1, 'ok')
  return out
end
return redis.error_reply('unknown kv operation ' .. op)
