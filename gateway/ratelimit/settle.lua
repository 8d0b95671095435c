-- The end of an admitted exchange: correct its token budgets by what it really used, and drop its leases.
-- KEYS[1 .. g]: token budgets; KEYS[g+1 ..]: lease sets.
-- ARGV: now_ms (-1: the server's clock), lease id, correction in tokens (positive: debt, negative: refund),
--       ms per token of each budget, space-separated; how far ahead a debt may push each budget, in ms,
--       space-separated (-1: no bound; see budget.token_intervals).
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local correction, intervals, reaches = tonumber(ARGV[3]), {}, {}
for v in string.gmatch(ARGV[4], '%S+') do intervals[#intervals + 1] = tonumber(v) end
for v in string.gmatch(ARGV[5], '%S+') do reaches[#reaches + 1] = tonumber(v) end
local g = #intervals
for i = 1, g do
  local interval = intervals[i]
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  tat = math.max(tat + correction * interval, now)
  if reaches[i] >= 0 then tat = math.min(tat, now + reaches[i]) end
  if tat > now then
    redis.call('SET', KEYS[i], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
  else
    redis.call('DEL', KEYS[i])
  end
end
for j = g + 1, #KEYS do
  redis.call('ZREM', KEYS[j], ARGV[2])
end
return 0
