-- complete: ARGV[2] plan, [3] path, [4] fence attempt, [5] fence owner
-- ('' = none), [6] artifact, [7] now ms.
-- Leased or Built -> Done, releasing dependents whose last unfinished
-- dependency this was; Done -> no-op.
-- Reply: {'ok' | 'noop', done, total, finished, released...},
-- {'stale', ...}, {'state', state} or {'unknown_task'}.
local plan, path, attempt, owner, artifact, now =
  ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local tk = task_key(plan, path)
local pk = plan_key(plan)
local state = redis.call('HGET', tk, 'state')
if not state then return {'unknown_task'} end
if not fence_holds(tk, state, attempt, owner) then return stale_reply(tk, state) end
if state == 'done' then
  local done, total, finished = plan_counts(pk)
  return {'noop', done, total, finished}
end
if state ~= 'leased' and state ~= 'built' then return {'state', state} end
drop_lease(tk, plan, path)
redis.call('HSET', tk, 'state', 'done', 'artifact', artifact, 'updated_ms', now)
redis.call('HDEL', tk, 'error')
local released = {}
for _, d in ipairs(cjson.decode(redis.call('HGET', tk, 'dependents') or '[]')) do
  local dk = task_key(plan, d)
  local ds = redis.call('HGET', dk, 'state')
  if ds then
    local left = redis.call('HINCRBY', dk, 'pending', -1)
    if left < 0 then
      redis.call('HSET', dk, 'pending', '0')
      left = 0
    end
    if left == 0 and ds == 'pending' then
      redis.call('HSET', dk, 'updated_ms', now)
      make_ready(plan, d, dk, 'new')
      table.insert(released, d)
    end
  end
end
redis.call('HINCRBY', pk, 'done', 1)
redis.call('HSET', pk, 'updated_ms', now)
local done, total, finished = plan_counts(pk)
local out = {'ok', done, total, finished}
for _, d in ipairs(released) do table.insert(out, d) end
return out
