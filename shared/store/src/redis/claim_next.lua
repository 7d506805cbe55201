-- claim_next: ARGV[2] owner, ARGV[3] lease expiry ms, ARGV[4] now ms.
-- Reply: {'none'} or the leased task's record.
local owner, expires, now = ARGV[2], ARGV[3], ARGV[4]
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
