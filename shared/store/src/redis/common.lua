-- Shared prelude of every devfleet store script (prepended to each one).
-- ARGV[1] is the key prefix; scripts compute the keys they touch from it,
-- so the store needs a single Redis (not Cluster).
--
-- Layout (P = prefix):
--   P:plan:<id>          hash   plan record + counts (total/done/failed/blocked)
--   P:plans              zset   plan ids scored by created_ms
--   P:plantasks:<id>     list   task paths in plan order
--   P:task:<id>:<path>   hash   task record; `pending` = unfinished deps,
--                              `ready_member` while Ready, lease fields while Leased
--   P:ready              zset   ready set: score = class rank * 2^32 + (2^32-1 - priority),
--                              member = <seq:020>|<plan>|<path>, so equal scores are FIFO
--   P:seq                string sequence for ready members
--   P:leases             zset   <plan>|<path> scored by lease expiry (ms)
local P = ARGV[1]
local READY = P .. ':ready'
local LEASES = P .. ':leases'
local SEQ = P .. ':seq'
local PLANS = P .. ':plans'

local function plan_key(plan) return P .. ':plan:' .. plan end
local function plantasks_key(plan) return P .. ':plantasks:' .. plan end
local function task_key(plan, path) return P .. ':task:' .. plan .. ':' .. path end
local function lease_member(plan, path) return plan .. '|' .. path end

-- Same as rules::ready_score in Rust.
local function ready_score(class, priority)
  local rank = 1
  if class == 'fix' then rank = 0 end
  return string.format('%d', rank * 4294967296 + (4294967295 - tonumber(priority)))
end

-- Same as rules::blocked_cause in Rust.
local function blocked_cause(path, err)
  return 'blocked by ' .. path .. ': ' .. err
end

local function is_final(state)
  return state == 'done' or state == 'failed' or state == 'blocked'
end

-- Takes the task out of the ready set if it is in it.
local function leave_ready(tk)
  local m = redis.call('HGET', tk, 'ready_member')
  if m then
    redis.call('ZREM', READY, m)
    redis.call('HDEL', tk, 'ready_member')
  end
end

-- Puts the task at the back of its (class, priority) band.
local function make_ready(plan, path, tk, class)
  leave_ready(tk)
  local seq = redis.call('INCR', SEQ)
  local member = string.format('%020d', seq) .. '|' .. plan .. '|' .. path
  local priority = redis.call('HGET', tk, 'priority') or '0'
  redis.call('ZADD', READY, ready_score(class, priority), member)
  redis.call('HSET', tk, 'state', 'ready', 'class', class, 'ready_member', member)
end

local function drop_lease(tk, plan, path)
  redis.call('ZREM', LEASES, lease_member(plan, path))
  redis.call('HDEL', tk, 'lease_owner', 'lease_expires_ms')
end

-- Releases what run member '<attempt>|<path>' reserved of the plan's budget
-- (P:budget_runs:<plan>), if it still holds a reservation: its run
-- reconciled it (record_usage) or ended without doing so (the worker died
-- or lost its lease). Same as memory.rs Sets::release_reservation.
local function release_reservation(plan, member)
  local runs = P .. ':budget_runs:' .. plan
  local held = redis.call('HGET', runs, member)
  if not held then return end
  local budget = P .. ':budget:' .. plan
  local sep = string.find(held, '|', 1, true)
  -- (a zero is skipped: Lua would format its negation as '-0')
  local t, n = tonumber(string.sub(held, 1, sep - 1)), tonumber(string.sub(held, sep + 1))
  if t ~= 0 then redis.call('HINCRBY', budget, 'reserved_tokens', -t) end
  if n ~= 0 then redis.call('HINCRBY', budget, 'reserved_nusd', -n) end
  redis.call('HDEL', runs, member)
end

-- The budget run member of the task's current attempt.
local function run_member(tk, path)
  return (redis.call('HGET', tk, 'attempt') or '0') .. '|' .. path
end

-- Leases the task to owner until expires; a fresh lease starts a new attempt
-- (releasing the reservation the previous attempt's run never reconciled).
local function lease(tk, plan, path, owner, expires, now, fresh)
  redis.call('HSET', tk, 'state', 'leased', 'lease_owner', owner,
    'lease_expires_ms', expires, 'updated_ms', now)
  if fresh then
    release_reservation(plan, run_member(tk, path))
    redis.call('HINCRBY', tk, 'attempt', 1)
  end
  redis.call('ZADD', LEASES, expires, lease_member(plan, path))
end

-- The task hash as a reply: {'ok', field, value, ...}.
local function record_reply(tk)
  local r = redis.call('HGETALL', tk)
  table.insert(r, 1, 'ok')
  return r
end

local function plan_counts(pk)
  local c = redis.call('HMGET', pk, 'total', 'done', 'failed', 'blocked')
  local total, done = tonumber(c[1]) or 0, tonumber(c[2]) or 0
  local failed, blocked = tonumber(c[3]) or 0, tonumber(c[4]) or 0
  local finished = '0'
  if done + failed + blocked == total then finished = '1' end
  return tostring(done), tostring(total), finished
end

-- The store's clock in ms: Redis TIME (allowed in scripts, whose effects
-- are replicated), plus the skew a test may set in P:clock_skew_ms (absent
-- otherwise). Lease times come only from here.
local function store_now()
  local t = redis.call('TIME')
  local skew = tonumber(redis.call('GET', P .. ':clock_skew_ms') or '0') or 0
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + skew
end

local function ms(n) return string.format('%d', n) end

-- Same as rules::check_fence: the write's attempt is the task's and, if it
-- names an owner ('' = none) while the task is Leased, that owner holds it.
local function fence_holds(tk, state, attempt, owner)
  if (redis.call('HGET', tk, 'attempt') or '0') ~= attempt then return false end
  if owner ~= '' and state == 'leased'
      and redis.call('HGET', tk, 'lease_owner') ~= owner then
    return false
  end
  return true
end

-- The reply for a stale fence: {'stale', state, attempt, lease owner or ''}.
local function stale_reply(tk, state)
  return {'stale', state, redis.call('HGET', tk, 'attempt') or '0',
    redis.call('HGET', tk, 'lease_owner') or ''}
end
