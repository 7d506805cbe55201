-- claim: ARGV[2] plan, [3] path, [4] owner, [5] '1' if a handoff,
-- [6] handoff_from, [7] lease ms. Times are the store's clock.
-- Reply: the record ({'ok', ...}), {'held', owner, expires_ms},
-- {'state', state} or {'unknown_task'}.
local plan, path, owner = ARGV[2], ARGV[3], ARGV[4]
local handoff, from = ARGV[5] == '1', ARGV[6]
local tk = task_key(plan, path)
local state = redis.call('HGET', tk, 'state')
if not state then return {'unknown_task'} end
local now = store_now()
local expires = ms(now + tonumber(ARGV[7]))
now = ms(now)
if state == 'ready' then
  leave_ready(tk)
  lease(tk, plan, path, owner, expires, now, true)
  return record_reply(tk)
end
if state ~= 'leased' then return {'state', state} end
local current = redis.call('HGET', tk, 'lease_owner') or ''
local current_exp = redis.call('HGET', tk, 'lease_expires_ms')
if current == owner or (handoff and current == from) then
  lease(tk, plan, path, owner, expires, now, false)
  return record_reply(tk)
end
if current_exp == false or tonumber(current_exp) < tonumber(now) then
  lease(tk, plan, path, owner, expires, now, true)
  return record_reply(tk)
end
return {'held', current, current_exp}
