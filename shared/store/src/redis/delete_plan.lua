-- delete_plan: ARGV[2] plan, [3] before ms. Deletes a plan whose status
-- is final and whose updated_ms is before ARGV[3], with its task list and
-- tasks (out of the ready and lease sets). Reply: {'ok', '1'} when deleted,
-- {'ok', '0'} when the plan is absent, live or too recent.
local plan, before = ARGV[2], tonumber(ARGV[3])
local pk = plan_key(plan)
local f = redis.call('HMGET', pk, 'status', 'updated_ms')
local status, updated = f[1], tonumber(f[2])
if not status then return {'ok', '0'} end
if status ~= 'succeeded' and status ~= 'failed' and status ~= 'rejected' then return {'ok', '0'} end
if not updated or updated >= before then return {'ok', '0'} end
for _, path in ipairs(redis.call('LRANGE', plantasks_key(plan), 0, -1)) do
  local tk = task_key(plan, path)
  leave_ready(tk)
  redis.call('ZREM', LEASES, lease_member(plan, path))
  redis.call('DEL', tk)
end
redis.call('DEL', plantasks_key(plan), pk, P .. ':usage_runs:' .. plan,
  P .. ':usage_model:' .. plan, P .. ':usage_task:' .. plan,
  P .. ':budget:' .. plan, P .. ':budget_runs:' .. plan)
redis.call('ZREM', PLANS, plan)
return {'ok', '1'}
