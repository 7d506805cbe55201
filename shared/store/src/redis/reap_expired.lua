-- reap_expired: leases with expiry < now (the store's clock) return to
-- Ready (class kept), in (expiry, member) order; what the expired
-- attempt reserved of its plan's budget is released.
-- Reply: {'ok', plan1, path1, plan2, path2, ...}.
local now = ms(store_now())
local out = {'ok'}
local expired = redis.call('ZRANGEBYSCORE', LEASES, '-inf', '(' .. now)
for _, member in ipairs(expired) do
  redis.call('ZREM', LEASES, member)
  local plan, path = string.match(member, '^([^|]*)|(.*)$')
  if plan then
    local tk = task_key(plan, path)
    if redis.call('HGET', tk, 'state') == 'leased' then
      redis.call('HDEL', tk, 'lease_owner', 'lease_expires_ms')
      redis.call('HSET', tk, 'updated_ms', now)
      release_reservation(plan, run_member(tk, path))
      make_ready(plan, path, tk, redis.call('HGET', tk, 'class') or 'new')
      table.insert(out, plan)
      table.insert(out, path)
    end
  end
end
return out
