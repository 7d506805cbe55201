-- requeue: ARGV[2] plan, [3] path, [4] fence attempt, [5] fence owner
-- ('' = none), [6] class, [7] '1' if an error follows, [8] error,
-- [9] now ms. Leased, Built or Ready -> back of the ready set.
-- Reply: {'ok'}, {'stale', ...}, {'state', state} or {'unknown_task'}.
local plan, path, attempt, owner = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local class, has_error, err, now = ARGV[6], ARGV[7] == '1', ARGV[8], ARGV[9]
local tk = task_key(plan, path)
local state = redis.call('HGET', tk, 'state')
if not state then return {'unknown_task'} end
if not fence_holds(tk, state, attempt, owner) then return stale_reply(tk, state) end
if state ~= 'leased' and state ~= 'built' and state ~= 'ready' then
  return {'state', state}
end
drop_lease(tk, plan, path)
if has_error then
  redis.call('HSET', tk, 'error', err)
else
  redis.call('HDEL', tk, 'error')
end
redis.call('HSET', tk, 'updated_ms', now)
make_ready(plan, path, tk, class)
return {'ok'}
