-- mark_built: ARGV[2] plan, [3] path, [4] fence attempt, [5] fence owner
-- ('' = none), [6] artifact, [7] now ms.
-- Leased by the fence -> Built (lease released); Built with this artifact
-- or Done at the fence's attempt -> no-op; else stale or invalid state.
-- Reply: {'ok'}, {'stale', ...}, {'state', state} or {'unknown_task'}.
local plan, path, attempt, owner, artifact, now =
  ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local tk = task_key(plan, path)
local state = redis.call('HGET', tk, 'state')
if not state then return {'unknown_task'} end
if not fence_holds(tk, state, attempt, owner) then return stale_reply(tk, state) end
if state == 'leased' and owner ~= '' then
  drop_lease(tk, plan, path)
  redis.call('HSET', tk, 'state', 'built', 'artifact', artifact, 'updated_ms', now)
  return {'ok'}
end
if state == 'built' and redis.call('HGET', tk, 'artifact') == artifact then return {'ok'} end
if state == 'done' then return {'ok'} end
if state == 'leased' or state == 'built' or state == 'ready' then
  return stale_reply(tk, state)
end
return {'state', state}
