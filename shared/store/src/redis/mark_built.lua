-- mark_built: ARGV[2] plan, [3] path, [4] artifact, [5] now ms.
-- Leased or Built -> Built (lease released); Done -> no-op.
-- Reply: {'ok'}, {'state', state} or {'unknown_task'}.
local plan, path, artifact, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local tk = task_key(plan, path)
local state = redis.call('HGET', tk, 'state')
if not state then return {'unknown_task'} end
if state == 'done' then return {'ok'} end
if state ~= 'leased' and state ~= 'built' then return {'state', state} end
drop_lease(tk, plan, path)
redis.call('HSET', tk, 'state', 'built', 'artifact', artifact, 'updated_ms', now)
return {'ok'}
