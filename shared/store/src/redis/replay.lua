-- replay: ARGV[2] plan, [3] path, [4] now ms.
-- Failed -> Ready (or Pending with unfinished deps; Blocked if a dependency
-- is itself failed or blocked), attempt 0; then every blocked task
-- downstream none of whose direct dependencies is failed or blocked is
-- unblocked the same way, until nothing changes.
-- Reply: {'ok'}, {'state', state} or {'unknown_task'}.
local plan, path, now = ARGV[2], ARGV[3], ARGV[4]
local tk = task_key(plan, path)
local pk = plan_key(plan)
local state = redis.call('HGET', tk, 'state')
if not state then return {'unknown_task'} end
if state ~= 'failed' then return {'state', state} end

local function deps_of(k)
  return cjson.decode(redis.call('HGET', k, 'depends_on') or '[]')
end

local bad = nil
for _, d in ipairs(deps_of(tk)) do
  local f = redis.call('HMGET', task_key(plan, d), 'state', 'error')
  if f[1] == 'failed' then
    bad = blocked_cause(d, f[2] or '')
    break
  elseif f[1] == 'blocked' then
    bad = f[2] or ''
    break
  end
end
redis.call('HINCRBY', pk, 'failed', -1)
redis.call('HSET', pk, 'updated_ms', now)
redis.call('HSET', tk, 'attempt', '0', 'updated_ms', now)
if bad then
  redis.call('HSET', tk, 'state', 'blocked', 'error', bad)
  redis.call('HINCRBY', pk, 'blocked', 1)
  return {'ok'}
end
redis.call('HDEL', tk, 'error')

local function reopen(k, p)
  if tonumber(redis.call('HGET', k, 'pending') or '0') == 0 then
    make_ready(plan, p, k, 'new')
  else
    redis.call('HSET', k, 'state', 'pending')
  end
end
reopen(tk, path)

-- Blocked tasks downstream, in breadth-first order.
local closure = {}
local queue = cjson.decode(redis.call('HGET', tk, 'dependents') or '[]')
local seen = {}
local i = 1
while i <= #queue do
  local d = queue[i]
  i = i + 1
  if not seen[d] then
    seen[d] = true
    local dk = task_key(plan, d)
    local ds = redis.call('HGET', dk, 'state')
    if ds then
      if ds == 'blocked' then table.insert(closure, d) end
      for _, dd in ipairs(cjson.decode(redis.call('HGET', dk, 'dependents') or '[]')) do
        table.insert(queue, dd)
      end
    end
  end
end

local unblocked = 0
local changed = true
while changed do
  changed = false
  for _, d in ipairs(closure) do
    local dk = task_key(plan, d)
    if redis.call('HGET', dk, 'state') == 'blocked' then
      local clear = true
      for _, dep in ipairs(deps_of(dk)) do
        local s = redis.call('HGET', task_key(plan, dep), 'state')
        if s == 'failed' or s == 'blocked' then
          clear = false
          break
        end
      end
      if clear then
        redis.call('HSET', dk, 'attempt', '0', 'updated_ms', now)
        redis.call('HDEL', dk, 'error')
        reopen(dk, d)
        unblocked = unblocked + 1
        changed = true
      end
    end
  end
end
if unblocked > 0 then redis.call('HINCRBY', pk, 'blocked', 0 - unblocked) end
return {'ok'}
