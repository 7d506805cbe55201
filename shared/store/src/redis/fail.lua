-- fail: ARGV[2] plan, [3] path, [4] fence attempt, [5] fence owner
-- ('' = none), [6] error, [7] now ms.
-- Any non-final state -> Failed; every transitive dependent not yet final
-- -> Blocked with the cause; Failed -> no-op.
-- Reply: {'ok' | 'noop', finished, blocked...}, {'stale', ...},
-- {'state', state} or {'unknown_task'}.
local plan, path, attempt, owner, err, now =
  ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local tk = task_key(plan, path)
local pk = plan_key(plan)
local state = redis.call('HGET', tk, 'state')
if not state then return {'unknown_task'} end
if not fence_holds(tk, state, attempt, owner) then return stale_reply(tk, state) end
if state == 'failed' then
  local _, _, finished = plan_counts(pk)
  return {'noop', finished}
end
if state == 'done' or state == 'blocked' then return {'state', state} end
leave_ready(tk)
drop_lease(tk, plan, path)
redis.call('HSET', tk, 'state', 'failed', 'error', err, 'updated_ms', now)
local cause = blocked_cause(path, err)
local queue = cjson.decode(redis.call('HGET', tk, 'dependents') or '[]')
local seen = {}
local blocked = {}
local i = 1
while i <= #queue do
  local d = queue[i]
  i = i + 1
  if not seen[d] then
    seen[d] = true
    local dk = task_key(plan, d)
    local ds = redis.call('HGET', dk, 'state')
    if ds then
      if not is_final(ds) then
        leave_ready(dk)
        drop_lease(dk, plan, d)
        redis.call('HSET', dk, 'state', 'blocked', 'error', cause, 'updated_ms', now)
        table.insert(blocked, d)
      end
      for _, dd in ipairs(cjson.decode(redis.call('HGET', dk, 'dependents') or '[]')) do
        table.insert(queue, dd)
      end
    end
  end
end
redis.call('HINCRBY', pk, 'failed', 1)
redis.call('HINCRBY', pk, 'blocked', #blocked)
redis.call('HSET', pk, 'updated_ms', now)
local _, _, finished = plan_counts(pk)
local out = {'ok', finished}
for _, d in ipairs(blocked) do table.insert(out, d) end
return out
