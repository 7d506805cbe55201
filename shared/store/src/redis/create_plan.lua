-- create_plan: ARGV[2] plan id, ARGV[3] JSON payload prepared (and
-- validated) in Rust: {plan fields as strings, tasks = [{path, spec,
-- content?, executor?, priority, estimate, pending, depends_on (JSON text),
-- dependents (JSON text)}]}.
-- Reply: {'exists'} (nothing written) or {'ok'}.
local id = ARGV[2]
local pk = plan_key(id)
if redis.call('EXISTS', pk) == 1 then return {'exists'} end
local p = cjson.decode(ARGV[3])
redis.call('HSET', pk, 'id', id, 'name', p.name, 'status', p.status,
  'total', p.total, 'done', '0', 'failed', '0', 'blocked', '0',
  'created_ms', p.created_ms, 'updated_ms', p.updated_ms, 'detail', p.detail)
if type(p.message) == 'string' then redis.call('HSET', pk, 'message', p.message) end
redis.call('ZADD', PLANS, p.created_ms, id)
for _, t in ipairs(p.tasks) do
  local tk = task_key(id, t.path)
  redis.call('RPUSH', plantasks_key(id), t.path)
  redis.call('HSET', tk, 'plan_id', id, 'path', t.path, 'spec', t.spec,
    'depends_on', t.depends_on, 'dependents', t.dependents,
    'priority', t.priority, 'estimate', t.estimate, 'state', 'pending',
    'class', 'new', 'attempt', '0', 'pending', t.pending,
    'updated_ms', p.created_ms)
  if type(t.content) == 'string' then redis.call('HSET', tk, 'content', t.content) end
  if type(t.executor) == 'string' then redis.call('HSET', tk, 'executor', t.executor) end
  -- Tasks with no dependencies enter the ready set in plan order.
  if t.pending == '0' then make_ready(id, t.path, tk, 'new') end
end
return {'ok'}
