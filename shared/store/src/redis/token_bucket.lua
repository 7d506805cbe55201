-- token_bucket: ARGV[2] bucket, [3] capacity, [4] window ms, [5] 'take' or
-- 'drain', [6] tokens to take or ms to drain for.
-- Restates rules::token_bucket_step. State: hash P:bucket:<name> with
-- `tokens` and `at` (store clock ms); expires after two idle windows.
-- Reply: 0 when done, else the wait in ms before the take can succeed.
local key = P .. ':bucket:' .. ARGV[2]
local capacity = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local per_ms = capacity / window
local now = store_now()
local s = redis.call('HMGET', key, 'tokens', 'at')
local tokens, at = capacity, now
if s[1] then
  tokens, at = tonumber(s[1]), tonumber(s[2])
end
tokens = math.min(capacity, tokens + math.max(0, now - at) * per_ms)
local amount = tonumber(ARGV[6])
local wait = 0
if ARGV[5] == 'take' then
  local needed = math.min(amount, capacity)
  if tokens >= needed then
    tokens = tokens - amount
  else
    wait = math.max(1, math.ceil((needed - tokens) / per_ms))
  end
else
  tokens = math.min(tokens, 0) - amount * per_ms
end
redis.call('HSET', key, 'tokens', string.format('%.17g', tokens), 'at', ms(now))
redis.call('PEXPIRE', key, ms(2 * window + math.max(0, -tokens) / per_ms))
return wait
