-- renew: ARGV[2] plan, [3] path, [4] fence attempt, [5] fence owner
-- ('' = none), [6] lease ms (the store's clock).
-- Reply: {'ok'}, {'lost'} or {'unknown_task'}.
local plan, path, attempt, owner = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local tk = task_key(plan, path)
local t = redis.call('HMGET', tk, 'state', 'lease_owner', 'lease_expires_ms', 'attempt')
if not t[1] then return {'unknown_task'} end
local now = store_now()
if owner == '' or t[1] ~= 'leased' or t[2] ~= owner or t[4] ~= attempt
    or not t[3] or tonumber(t[3]) < now then
  return {'lost'}
end
lease(tk, plan, path, owner, ms(now + tonumber(ARGV[6])), ms(now), false)
return {'ok'}
