-- set_plan_status: ARGV[2] plan, [3] status, [4] '1' if a message follows,
-- [5] message, [6] now ms. Reply: {'ok'} or {'unknown_plan'}.
local pk = plan_key(ARGV[2])
if redis.call('EXISTS', pk) == 0 then return {'unknown_plan'} end
redis.call('HSET', pk, 'status', ARGV[3], 'updated_ms', ARGV[6])
if ARGV[4] == '1' then
  redis.call('HSET', pk, 'message', ARGV[5])
else
  redis.call('HDEL', pk, 'message')
end
return {'ok'}
