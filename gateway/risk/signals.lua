-- A batch of risk observations, atomically: update each identity's decayed signals and the cross-account
-- sketches, and return each observation's signals. gateway/risk/signals.py (MemorySignals) holds the same
-- arithmetic for memory storage; a test runs both on the same traffic. Cross-account sets are HyperLogLogs
-- here (about 1% error) where memory keeps exact sets.
--
-- Every key starts with ARGV[1], a prefix carrying one hash tag, so on a Cluster all live in one slot.
-- ARGV: prefix, tau seconds, max skeletons, swept-by accounts, identity ttl seconds, then per observation
--       nine fields: identity, time, prefix hash, suffix hash, words, reasoning, probe, unmarked, network.
-- Returns per observation twelve strings: requests, concentration, swept share, swept requests,
--   template accounts, template variants, reasoning share, probes, unmarked share, length spread,
--   timing spread (-1: fewer than two gaps), network accounts.

local root, tau, max_skeletons = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local swept_by, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
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
  redis.call('PFADD', name, member)
  redis.call('EXPIRE', name, 3 * DAY)
end

for i = 6, #ARGV, 9 do
  local id, t = ARGV[i], tonumber(ARGV[i + 1])
  local pre, suf = ARGV[i + 2], ARGV[i + 3]
  local words, reasoning, probe, unmarked = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6]), tonumber(ARGV[i + 7])
  local network = ARGV[i + 8]
  local ik, kk = root .. ':i:' .. id, root .. ':k:' .. id
  local s = redis.call('HMGET', ik, 'last', 'n', 'rs', 'pr', 'um', 'sw', 'lm', 'lv', 'gm', 'gv', 'gn')
  local last, n = num(s[1]), num(s[2])
  local rs, pr, um, sw = num(s[3]), num(s[4]), num(s[5]), num(s[6])
  local lm, lv, gm, gv, gn = num(s[7]), num(s[8]), num(s[9]), num(s[10]), num(s[11])
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

  -- this identity's decayed counts per skeleton, and the largest
  local flat = redis.call('HGETALL', kk)
  local counts, names = {}, {}
  for j = 1, #flat, 2 do
    counts[flat[j]] = tonumber(flat[j + 1]) * factor
    names[#names + 1] = flat[j]
  end
  for _, key in ipairs({'p' .. pre, 's' .. suf}) do
    if counts[key] == nil then names[#names + 1] = key end
    counts[key] = (counts[key] or 0) + 1
  end
  table.sort(names, function(a, b) return counts[a] > counts[b] end)
  redis.call('DEL', kk)
  local fields = {}
  for j = 1, math.min(#names, max_skeletons) do
    fields[#fields + 1] = names[j]
    fields[#fields + 1] = fmt(counts[names[j]])
  end
  redis.call('HSET', kk, unpack(fields))
  redis.call('EXPIRE', kk, ttl)
  local top = counts[names[1]]

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
    'lm', fmt(lm), 'lv', fmt(lv), 'gm', fmt(gm), 'gv', fmt(gv), 'gn', fmt(gn))
  redis.call('EXPIRE', ik, ttl)
  local gaps = -1
  if gn >= 2 then gaps = math.sqrt(math.max(gv, 0)) end
  local row = {n, top / n, sw / n, sw, accounts, others, rs / n, pr, um / n, math.sqrt(math.max(lv, 0)), gaps,
    network_accounts}
  for _, v in ipairs(row) do out[#out + 1] = fmt(v) end
end
return out
