-- reserve_budget: ARGV[2] plan, [3] run member '<attempt>|<path>',
-- [4] expected tokens, [5] expected nano-dollars, [6] default max tokens,
-- [7] default max nano-dollars ('' = no limit). The plan's own limits
-- (P:budget:<plan> with limits_set = '1': max_tokens, max_nusd, absent =
-- no limit) win over the defaults. The rule is BudgetLimits::covers.
-- Reply: {'granted'}, {'exhausted', max_tokens, max_nusd, spent_tokens,
-- spent_nusd, reserved_tokens, reserved_nusd} (limits '' when none), or
-- {'unknown_plan'}.
local plan, member = ARGV[2], ARGV[3]
local tokens, nusd = tonumber(ARGV[4]), tonumber(ARGV[5])
if redis.call('EXISTS', plan_key(plan)) == 0 then return {'unknown_plan'} end
local budget = P .. ':budget:' .. plan
local runs = P .. ':budget_runs:' .. plan
local f = redis.call('HMGET', budget, 'limits_set', 'max_tokens', 'max_nusd',
  'spent_tokens', 'spent_nusd', 'reserved_tokens', 'reserved_nusd')
local max_tokens, max_nusd = ARGV[6], ARGV[7]
if f[1] == '1' then max_tokens, max_nusd = f[2] or '', f[3] or '' end
if max_tokens == '' and max_nusd == '' then return {'granted'} end
if redis.call('HEXISTS', runs, member) == 1 then return {'granted'} end
local spent_t, spent_n = tonumber(f[4] or '0'), tonumber(f[5] or '0')
local res_t, res_n = tonumber(f[6] or '0'), tonumber(f[7] or '0')
local function fits(max, used, next)
  if max == '' then return true end
  max = tonumber(max)
  if next == 0 then return used < max end
  return used + next <= max
end
if not (fits(max_tokens, spent_t + res_t, tokens) and fits(max_nusd, spent_n + res_n, nusd)) then
  return {'exhausted', max_tokens, max_nusd, tostring(spent_t), tostring(spent_n),
    tostring(res_t), tostring(res_n)}
end
redis.call('HINCRBY', budget, 'reserved_tokens', tokens)
redis.call('HINCRBY', budget, 'reserved_nusd', nusd)
redis.call('HSET', runs, member, ARGV[4] .. '|' .. ARGV[5])
return {'granted'}
