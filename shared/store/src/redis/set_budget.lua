-- set_budget: ARGV[2] plan, [3] max tokens, [4] max nano-dollars ('' = no
-- limit). Replaces the plan's limits in P:budget:<plan>; spend is kept.
-- The plan need not exist yet. Reply: {'ok'}.
local plan = ARGV[2]
local budget = P .. ':budget:' .. plan
redis.call('HSET', budget, 'limits_set', '1')
if ARGV[3] == '' then redis.call('HDEL', budget, 'max_tokens')
else redis.call('HSET', budget, 'max_tokens', ARGV[3]) end
if ARGV[4] == '' then redis.call('HDEL', budget, 'max_nusd')
else redis.call('HSET', budget, 'max_nusd', ARGV[4]) end
return {'ok'}
