-- One admission, atomically: read the identity's tier, check every limit, and debit all or nothing.
-- gateway/ratelimit/budget.py holds the same logic for memory storage; a test runs both on the same inputs.
--
-- KEYS[1]          the identity's tier override (absent: ARGV[2], the tier its registry entry names)
-- KEYS[2 .. 1+g]   GCRA budgets (requests or tokens): each holds its theoretical arrival time, in ms
-- KEYS[2+g ..]     concurrency lease sets: member = lease id, score = expiry in ms
-- ARGV: now_ms (-1: the server's clock), default tier, tier table ("name scale enforce cap;" ...),
--       checks ("limit period unit;" for each key after the first; unit r, t or c: requests, tokens,
--       concurrency, whose period is 0), lease id, lease ttl ms, prompt tokens, requested output (-1: none),
--       default output, choices (answers written, each up to the output: the reservation counts them all).
-- Returns {status, tier, reserved tokens, output cap, retry ms, failed check, then per check: remaining, reset ms}
-- status: 0 admitted, 1 limited, 2 blocked, 3 larger than the whole budget.

-- a difference this small is the float error of epoch milliseconds and of TATs stored to 0.001 ms, no wait
-- (budget.SLACK_MS)
local SLACK_MS = 0.001
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function tier_entry(name)
  for n, s, e, c in string.gmatch(ARGV[3], '(%S+) (%S+) (%S+) (%S+);') do
    if n == name then return tonumber(s), tonumber(e), tonumber(c) end
  end
  return nil
end

local tier = redis.call('GET', KEYS[1]) or ARGV[2]
local scale, enforce, cap = tier_entry(tier)
if scale == nil then
  tier = ARGV[2]
  scale, enforce, cap = tier_entry(tier)
end
if scale == 0 then return {2, tier, 0, 0, 0, 0} end

local output = tonumber(ARGV[8])
if output < 0 then output = tonumber(ARGV[9]) end
if cap > 0 and output > cap then output = cap end
local tokens = tonumber(ARGV[7]) + tonumber(ARGV[10]) * output
if enforce == 0 then tokens = 0 end  -- reserves nothing: its usage is debited once known (budget.py)

local limits, periods, units = {}, {}, {}
local g = 0
for l, p, u in string.gmatch(ARGV[4], '(%S+) (%S+) (%S+);') do
  limits[#limits + 1], periods[#periods + 1], units[#units + 1] = tonumber(l), tonumber(p), u
  if u ~= 'c' then g = g + 1 end
end
local status, retry, failed = 0, 0, 0
local tats, out = {}, {}
for i = 1, g do
  local limit, period, unit = limits[i], periods[i], units[i]
  local cost = 1
  if unit == 't' then cost = tokens end
  local interval = period / (limit * scale)
  local span = period
  if unit == 'r' then span = math.max(period, interval) end  -- a scaled-down budget still admits one
  local tat = tonumber(redis.call('GET', KEYS[1 + i]) or '0')
  if tat < now then tat = now end
  local new_tat = tat + cost * interval
  local wait = new_tat - span - now
  if cost * interval > span then
    if enforce == 1 then status, failed = 3, i end
    new_tat = tat
  elseif wait > SLACK_MS then
    if enforce == 1 and status ~= 3 and wait > retry then status, retry, failed = 1, wait, i end
    new_tat = math.min(new_tat, now + span)
  end
  tats[i] = {new_tat, span, interval, tat}
end
for j = 1, #KEYS - 1 - g do
  local key, limit = KEYS[1 + g + j], math.max(math.floor(limits[g + j] * scale), 1)
  redis.call('ZREMRANGEBYSCORE', KEYS[1 + g + j], '-inf', now)
  local held = redis.call('ZCARD', key)
  if held >= limit and enforce == 1 and status == 0 then status, retry, failed = 1, 1000, g + j end
  out[g + j] = {math.max(limit - held - 1, 0), 0}
end

for i = 1, g do
  local new_tat, span, interval, tat = unpack(tats[i])
  if status ~= 0 then new_tat = tat end
  out[i] = {math.max(math.floor((now + span - new_tat + SLACK_MS) / interval), 0), math.ceil(new_tat - now)}
  if status == 0 and new_tat > now then
    redis.call('SET', KEYS[1 + i], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1000)
  end
end
if status == 0 then
  local ttl = tonumber(ARGV[6])
  for j = 1, #KEYS - 1 - g do
    redis.call('ZADD', KEYS[1 + g + j], now + ttl, ARGV[5])
    redis.call('PEXPIRE', KEYS[1 + g + j], ttl)
  end
end

local result = {status, tier, tokens, output, math.ceil(retry), failed}
for k = 1, #KEYS - 1 do
  result[#result + 1] = out[k][1]
  result[#result + 1] = out[k][2]
end
return result
