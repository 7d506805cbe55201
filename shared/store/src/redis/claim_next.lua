-- claim_next: ARGV[2] owner, ARGV[3] lease ms (the store's clock).
-- Reply: {'none'} or the leased task's record.
local owner = ARGV[2]
local now = store_now()
local expires = ms(now + tonumber(ARGV[3]))
now = ms(now)
while true do
  local first = redis.call('ZRANGE', READY, 0, 0)
  if #first == 0 then return {'none'} end
  local member = first[1]
  redis.call('ZREM', READY, member)
  local plan, path = string.match(member, '^%d+|([^|]*)|(.*)$')
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
