-- claim_next: ARGV[2] owner, ARGV[3] lease ms (the store's clock).
-- Reply: {'none'} or the leased task's record. Members of plans whose
-- status is 'budget_exhausted' are stepped over and stay in place (at most
-- 10000 of them, rules::MAX_HELD_SCAN, before the reply is 'none').
local owner = ARGV[2]
local now = store_now()
local expires = ms(now + tonumber(ARGV[3]))
now = ms(now)
local held = {}
local skip = 0
while true do
  local first = redis.call('ZRANGE', READY, skip, skip)
  if #first == 0 then return {'none'} end
  local member = first[1]
  local plan, path = string.match(member, '^%d+|([^|]*)|(.*)$')
  if plan and held[plan] == nil then
    held[plan] = redis.call('HGET', plan_key(plan), 'status') == 'budget_exhausted'
  end
  if plan and held[plan] then
    skip = skip + 1
    if skip >= 10000 then return {'none'} end
  else
    redis.call('ZREM', READY, member)
    if plan then
      local tk = task_key(plan, path)
      -- A member that no longer matches its task is dropped and skipped.
      if redis.call('HGET', tk, 'state') == 'ready'
          and redis.call('HGET', tk, 'ready_member') == member then
        redis.call('HDEL', tk, 'ready_member')
        lease(tk, plan, path, owner, expires, now, true)
        return record_reply(tk)
      end
    end
  end
end
