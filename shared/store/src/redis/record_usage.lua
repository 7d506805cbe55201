-- record_usage: ARGV[2] plan, [3] run member '<attempt>|<path>', [4] path,
-- then one group of 6 per model call: label, calls, tokens_in, tokens_out,
-- cost (nano-dollars), estimated. Adds them once per run member to
--   P:usage_model:<plan>  hash '<metric>|<label>' (the plan per model)
--   P:usage_task:<plan>   hash '<metric>|<path>'  (the plan per task)
--   P:usage_models        hash '<metric>|<label>' (the fleet per model)
-- with P:usage_runs:<plan> (set of run members) making it idempotent.
-- Reconciles the budget P:budget:<plan> in the same step: the run's
-- reservation (P:budget_runs:<plan>) is released, and, unless this is a
-- repeat, the usage added to spent_tokens / spent_nusd.
-- Reply: {'ok', '1'} when recorded, {'ok', '0'} for a repeat,
-- {'unknown_plan'}.
local plan, member, path = ARGV[2], ARGV[3], ARGV[4]
if redis.call('EXISTS', plan_key(plan)) == 0 then return {'unknown_plan'} end
local budget = P .. ':budget:' .. plan
release_reservation(plan, member)
if redis.call('SADD', P .. ':usage_runs:' .. plan, member) == 0 then return {'ok', '0'} end
local by_model = P .. ':usage_model:' .. plan
local by_task = P .. ':usage_task:' .. plan
local fleet = P .. ':usage_models'
local metrics = {'calls', 'tokens_in', 'tokens_out', 'cost_nusd', 'estimated'}
local i = 5
while ARGV[i] do
  local label = ARGV[i]
  for m = 1, 5 do
    local by = ARGV[i + m]
    if by ~= '0' then
      redis.call('HINCRBY', by_model, metrics[m] .. '|' .. label, by)
      redis.call('HINCRBY', by_task, metrics[m] .. '|' .. path, by)
      redis.call('HINCRBY', fleet, metrics[m] .. '|' .. label, by)
    end
  end
  redis.call('HINCRBY', budget, 'spent_tokens', tonumber(ARGV[i + 2]) + tonumber(ARGV[i + 3]))
  redis.call('HINCRBY', budget, 'spent_nusd', ARGV[i + 4])
  i = i + 6
end
return {'ok', '1'}
