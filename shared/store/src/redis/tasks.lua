-- tasks: ARGV[2] plan. A consistent snapshot of every task of a plan.
-- Reply: {{'unknown_plan'}} or {{'ok'}, {field, value, ...}, ...}.
local plan = ARGV[2]
if redis.call('EXISTS', plan_key(plan)) == 0 then return {{'unknown_plan'}} end
local out = {{'ok'}}
for _, path in ipairs(redis.call('LRANGE', plantasks_key(plan), 0, -1)) do
  table.insert(out, redis.call('HGETALL', task_key(plan, path)))
end
return out
