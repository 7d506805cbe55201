-- renew: ARGV[2] plan, [3] path, [4] owner, [5] new expiry ms, [6] now ms.
-- Reply: {'ok'}, {'lost'} or {'unknown_task'}.
local plan, path, owner, expires, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local tk = task_key(plan, path)
local t = redis.call('HMGET', tk, 'state', 'lease_owner', 'lease_expires_ms')
if not t[1] then return {'unknown_task'} end
if t[1] ~= 'leased' or t[2] ~= owner or not t[3] or tonumber(t[3]) < tonumber(now) then
  return {'lost'}
end
lease(tk, plan, path, owner, expires, now, false)
return {'ok'}
