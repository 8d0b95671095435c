-- A batch of risk observations, atomically: update each identity's decayed signals and the cross-account
-- sketches, and return each observation's signals. gateway/risk/signals.py (MemorySignals) holds the same
-- arithmetic for memory storage; a test runs both on the same traffic. Cross-account sets are HyperLogLogs
-- here (about 1% error) where memory keeps exact sets.
--
-- Every key starts with KEYS[1], a prefix carrying one hash tag, so on a Cluster all live in its slot.
-- ARGV: tau seconds, max skeletons, swept-by accounts, identity ttl seconds, rebase-at, quiet hours, then per observation
--       nine fields: identity, time, prefix hash, suffix hash, words, reasoning, probe, unmarked, network.
-- Returns per observation thirteen strings: requests, concentration, swept share, swept requests,
--   template accounts, template variants, reasoning share, probes, unmarked share, length spread,
--   timing spread (-1: fewer than two gaps), network accounts, quiet share.

local root, tau, max_skeletons = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local swept_by, ttl, rebase_at = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local quiet_hours = tonumber(ARGV[6])
local DAY = 86400
local out = {}

local function num(v) return tonumber(v) or 0 end
local function fmt(v) return string.format('%.17g', v) end

-- West's update of a decayed weighted mean and variance; `weight` is the past's decayed weight
local function running(mean, var, value, weight)
  local total = weight + 1
  local delta = value - mean
  mean = mean + delta / total
  var = weight * (var + delta * delta / total) / total
  return mean, var
end

-- sizes over today and yesterday, each the larger of the two days' (a lower bound of the union)
local function window(kind, day, key)
  local a = redis.call('PFCOUNT', root .. ':' .. kind .. ':' .. day .. ':' .. key)
  local b = redis.call('PFCOUNT', root .. ':' .. kind .. ':' .. (day - 1) .. ':' .. key)
  return math.max(a, b)
end

local function add(kind, day, key, member)
  local name = root .. ':' .. kind .. ':' .. day .. ':' .. key
  if redis.call('PFADD', name, member) == 1 then  -- created or changed: (re)arm its expiry
    redis.call('EXPIRE', name, 3 * DAY)
  end
end

local HOURS = {}
for h = 0, 23 do HOURS[h + 1] = 'h' .. h end

-- the share of the counts in the quietest `quiet_hours` consecutive hours, as a sliding sum (see
-- signals.quiet_share, which sums in the same order)
local function quiet_share(hours)
  local total, window = 0, 0
  for h = 1, 24 do total = total + hours[h] end
  if total <= 0 then return 0 end
  for h = 1, quiet_hours do window = window + hours[h] end
  local least = window
  for start = 1, 23 do
    window = window + hours[(start + quiet_hours - 1) % 24 + 1] - hours[start]
    least = math.min(least, window)
  end
  return math.max(least, 0) / total
end

for i = 7, #ARGV, 9 do
  local id, t = ARGV[i], tonumber(ARGV[i + 1])
  local pre, suf = ARGV[i + 2], ARGV[i + 3]
  local words, reasoning, probe, unmarked = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6]), tonumber(ARGV[i + 7])
  local network = ARGV[i + 8]
  local ik, kk = root .. ':i:' .. id, root .. ':k:' .. id
  local s = redis.call('HMGET', ik, 'last', 'n', 'rs', 'pr', 'um', 'sw', 'lm', 'lv', 'gm', 'gv', 'gn', 'kb', 'kt')
  local last, n = num(s[1]), num(s[2])
  local rs, pr, um, sw = num(s[3]), num(s[4]), num(s[5]), num(s[6])
  local lm, lv, gm, gv, gn = num(s[7]), num(s[8]), num(s[9]), num(s[10]), num(s[11])
  local base, top = num(s[12]), num(s[13])
  local factor = 1
  if n > 0 then
    factor = math.exp(-math.max(t - last, 0) / tau)
    gm, gv = running(gm, gv, math.log(math.max(t - last, 0.001)), gn * factor)
    gn = gn * factor + 1
  end
  local past = n * factor
  lm, lv = running(lm, lv, math.log(1 + words), past)
  n = past + 1
  rs, pr, um = rs * factor + reasoning, pr * factor + probe, um * factor + unmarked

  -- this identity's counts per skeleton, on a growing scale (see MemorySignals._count_skeletons)
  -- and per hour of the day on the same scale, in the identity's own hash
  if redis.call('EXISTS', kk) == 0 then
    base, top = t, 0
    redis.call('HDEL', ik, unpack(HOURS))
  end
  local grow = math.exp((t - base) / tau)
  if grow > rebase_at then
    local flat = redis.call('HGETALL', kk)
    for j = 1, #flat, 2 do redis.call('HSET', kk, flat[j], fmt(tonumber(flat[j + 1]) / grow)) end
    local old = redis.call('HMGET', ik, unpack(HOURS))
    for h = 1, 24 do redis.call('HSET', ik, HOURS[h], fmt(num(old[h]) / grow)) end
    top, base, grow = top / grow, t, 1
  end
  redis.call('HINCRBYFLOAT', ik, HOURS[math.floor(t / 3600) % 24 + 1], fmt(grow))
  local hours = {}
  for h, v in ipairs(redis.call('HMGET', ik, unpack(HOURS))) do hours[h] = num(v) end
  for _, key in ipairs({'p' .. pre, 's' .. suf}) do
    top = math.max(top, tonumber(redis.call('HINCRBYFLOAT', kk, key, fmt(grow))))
  end
  if redis.call('HLEN', kk) > 2 * max_skeletons then
    local flat = redis.call('HGETALL', kk)
    local names = {}
    for j = 1, #flat, 2 do names[#names + 1] = {flat[j], tonumber(flat[j + 1])} end
    table.sort(names, function(a, b) return a[2] > b[2] end)
    for j = max_skeletons + 1, #names do redis.call('HDEL', kk, names[j][1]) end
  end
  redis.call('EXPIRE', kk, ttl)

  -- across accounts: who used each skeleton, with which other ends; who came from the network
  local day = math.floor(t / DAY)
  local ends = {{'p' .. pre, suf}, {'s' .. suf, pre}}
  local accounts, others, swept = 0, 0, 0
  for _, e in ipairs(ends) do
    add('a', day, e[1], id)
    add('o', day, e[1], e[2])
  end
  for _, e in ipairs(ends) do
    local a, o = window('a', day, e[1]), window('o', day, e[1])
    if a >= swept_by and 2 * o >= a then swept = 1 end
    if a > accounts or (a == accounts and o > others) then accounts, others = a, o end
  end
  sw = sw * factor + swept
  add('n', day, network, id)
  local network_accounts = window('n', day, network)

  redis.call('HSET', ik, 'last', fmt(t), 'n', fmt(n), 'rs', fmt(rs), 'pr', fmt(pr), 'um', fmt(um), 'sw', fmt(sw),
    'lm', fmt(lm), 'lv', fmt(lv), 'gm', fmt(gm), 'gv', fmt(gv), 'gn', fmt(gn), 'kb', fmt(base), 'kt', fmt(top))
  redis.call('EXPIRE', ik, ttl)
  local gaps = -1
  if gn >= 2 then gaps = math.sqrt(math.max(gv, 0)) end
  local row = {n, top / grow / n, sw / n, sw, accounts, others, rs / n, pr, um / n, math.sqrt(math.max(lv, 0)), gaps,
    network_accounts, quiet_share(hours)}
  for _, v in ipairs(row) do out[#out + 1] = fmt(v) end
end
return out
