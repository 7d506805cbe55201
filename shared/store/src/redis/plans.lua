-- plans: a consistent snapshot of every plan, newest first.
-- Reply: {{field, value, ...}, ...}.
local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', PLANS, 0, -1)) do
  table.insert(out, redis.call('HGETALL', plan_key(id)))
end
return out
