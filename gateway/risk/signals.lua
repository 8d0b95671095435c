-- A batch of risk observations, atomically: update each identity's decayed signals and the cross-account
-- sets, and return each observation's signals. gateway/risk/signals.py (MemorySignals) holds the same
-- arithmetic for memory storage; a test runs both on the same traffic and requires the same numbers.
--
-- Lua here runs at about a microsecond per operation, so the script does few: an identity's running
-- statistics and hour counts are one packed string (one GET, one SET), its two skeletons' counts one HMGET
-- and one HSET, and each cross-account set is added to and counted in three or four calls.
--
-- Every key starts with KEYS[1], a prefix carrying one hash tag, so on a Cluster all live in its slot.
-- ARGV: tau seconds, max skeletons, swept-by accounts, identity ttl seconds, rebase-at, quiet hours, max set members,
--       popular-by accounts, recent prompts kept, words per end, then the observations packed in one string (see RECORD): one
--       argument, not eleven per observation, because the client spent more time encoding arguments than the
--       script spent reading them.
-- Returns per observation fourteen little-endian doubles packed in one string: requests, concentration, swept
--   share, swept requests, template accounts, template variants, reasoning share, probes, unmarked share,
--   length spread, timing spread (-1: fewer than two gaps), network accounts, quiet share, variety.

local root, tau, max_skeletons = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local swept_by, ttl, rebase_at = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local quiet_hours, max_members = tonumber(ARGV[6]), tonumber(ARGV[7])
local popular_by, recent, end_words = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local DAY = 86400
local out = {}

local function num(v) return tonumber(v) or 0 end
-- t // size as Python computes it: math.floor(t / size) can round up to the next integer just before a
-- boundary, fmod is exact
local function floor_div(t, size) return (t - math.fmod(t, size)) / size end
local function fmt(v) return string.format('%.17g', v) end

-- West's update of a decayed weighted mean and variance; `weight` is the past's decayed weight
local function running(mean, var, value, weight)
  local total = weight + 1
  local delta = value - mean
  mean = mean + delta / total
  var = weight * (var + delta * delta / total) / total
  return mean, var
end

-- Add `member` to today's set and return its size; a set stops growing at `cap` (max_members unless given),
-- far past every threshold (as MemorySignals' sets do). A new set lives through tomorrow's window. A set's
-- name is root .. kind .. day .. key, where kind (':acct') and day (':20400:') carry their colons: made once.
local function add(kind, day, key, member, cap)
  local name = root .. kind .. day .. key
  local size = redis.call('SCARD', name)
  if size < (cap or max_members) and redis.call('SADD', name, member) == 1 then
    size = size + 1
    if size == 1 then redis.call('EXPIRE', name, 3 * DAY) end
  end
  return size
end

-- the size over today and yesterday: the larger of the two days' (a lower bound of the union)
local function window(kind, yesterday, key, today)
  return math.max(today, redis.call('SCARD', root .. kind .. yesterday .. key))
end

-- An identity's running state, hour counts and recent prompts' ends: 39 doubles and then, per recent prompt
-- (oldest first, as many as the 39th says), its opening's and closing's word hashes (END_WORDS each, 16
-- bits), in one string read with one GET and written with one SET; its skeleton counts are a hash beside it.
-- The ends stay bytes: a prompt's come in the record as bytes and are appended, the oldest cut off; only
-- the count of distinct words reads them as numbers (unpacking and repacking them all took as long as the
-- rest of the script).
local STATE_SIZE, END_WORDS = 39, end_words
local ENDS = 2 * END_WORDS  -- word hashes per recent prompt
local ENDS_BYTES = 2 * ENDS
local STATE = '<' .. string.rep('d', STATE_SIZE)
local STATE_BYTES = 8 * STATE_SIZE
local RING = '<' .. string.rep('H', recent * ENDS)
local ROW = '<' .. string.rep('d', 14)
-- one observation: identity, prefix hash, suffix hash, network (each a 4-byte length and its bytes), time,
-- words, the reasoning, probe and unmarked flags, and its opening's and closing's word hashes (redis_signals.py
-- packs it)
local RECORD = '<I4c0I4c0I4c0I4c0dI4BBBc' .. ENDS_BYTES

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

-- The share of distinct words among the recent prompts' openings (side 0) or closings (side 1); 0 is no word.
-- signals._RecentEnds keeps the same two counts as prompts come and go. `seen` is one table for the whole
-- batch, marked with a new stamp for each count (a fresh table per count grew and rehashed every time).
local seen, stamp = {}, 0
local function distinct_share(ends, side)
  local distinct, total = 0, 0
  stamp = stamp + 1
  for j = 0, recent - 1 do
    for w = j * ENDS + side * END_WORDS + 1, j * ENDS + (side + 1) * END_WORDS do
      local h = ends[w]
      if h ~= 0 then
        total = total + 1
        if seen[h] ~= stamp then seen[h], distinct = stamp, distinct + 1 end
      end
    end
  end
  if total == 0 then return 1 end
  return distinct / total
end

-- Bring the skeleton counts back to scale 1 before they overflow.
local function rebase(kk, grow)
  local flat = redis.call('HGETALL', kk)
  for j = 1, #flat, 2 do redis.call('HSET', kk, flat[j], fmt(tonumber(flat[j + 1]) / grow)) end
end

-- Keep the max_skeletons largest skeleton counts; returns how many are kept.
local function trim(kk)
  local flat = redis.call('HGETALL', kk)
  local names = {}
  for j = 1, #flat, 2 do names[#names + 1] = {flat[j], tonumber(flat[j + 1])} end
  -- largest first; equal counts by name, so that the same ones go as in MemorySignals (whose sort is stable
  -- where Lua's is not, over an order HGETALL does not fix)
  table.sort(names, function(a, b) return a[2] > b[2] or (a[2] == b[2] and a[1] > b[1]) end)
  for j = max_skeletons + 1, #names do redis.call('HDEL', kk, names[j][1]) end
  return math.min(#names, max_skeletons)
end

local batch, at = ARGV[11], 1
while at <= #batch do
  local id, pre, suf, network, t, words, reasoning, probe, unmarked, new_ends
  id, pre, suf, network, t, words, reasoning, probe, unmarked, new_ends, at = struct.unpack(RECORD, batch, at)
  local ik, kk = root .. ':st:' .. id, root .. ':sk:' .. id
  local prefix_field, suffix_field = 'p' .. pre, 's' .. suf
  local packed = redis.call('GET', ik)
  local st = {}
  local recent_ends = ''
  if packed and #packed >= STATE_BYTES then
    st = {struct.unpack(STATE, packed)}
    recent_ends = string.sub(packed, STATE_BYTES + 1)
  end
  -- new, idle for ttl (by the observations' clock, as MemorySignals; Redis expires it by its own), or written
  -- in another layout: start afresh, skeleton counts included
  local kept_ends = st[STATE_SIZE]
  if not kept_ends or t - st[1] > ttl or kept_ends > recent or #recent_ends ~= kept_ends * ENDS_BYTES then
    st, recent_ends = {}, ''
    for j = 1, STATE_SIZE do st[j] = 0 end
    st[12] = t  -- the skeleton counts' scale is 1 now
    redis.call('DEL', kk)
  end
  local last, n, rs, pr, um, sw = st[1], st[2], st[3], st[4], st[5], st[6]
  local lm, lv, gm, gv, gn = st[7], st[8], st[9], st[10], st[11]
  local base, top, kept, recent_kept = st[12], st[13], st[14], st[39]
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

  -- counts per skeleton and per hour of the day, on a growing scale (see MemorySignals._count_skeletons)
  local hours = {}
  for h = 1, 24 do hours[h] = st[14 + h] end
  local counts = redis.call('HMGET', kk, prefix_field, suffix_field)
  local p_count, s_count = num(counts[1]), num(counts[2])
  local grow = math.exp((t - base) / tau)
  if grow > rebase_at then
    rebase(kk, grow)
    for h = 1, 24 do hours[h] = hours[h] / grow end
    p_count, s_count = p_count / grow, s_count / grow
    top, base, grow = top / grow, t, 1
  end
  local hour = floor_div(t, 3600) % 24 + 1
  hours[hour] = hours[hour] + grow
  if counts[1] == false then kept = kept + 1 end
  if counts[2] == false then kept = kept + 1 end
  p_count, s_count = p_count + grow, s_count + grow
  top = math.max(top, p_count, s_count)

  -- across accounts: who used each skeleton, with which other ends; who came from the network
  -- key names are root .. ':kind:' .. day .. ':' .. key; the day parts are made once per observation
  local day_number = floor_div(t, DAY)
  local day, yesterday = ':' .. day_number .. ':', ':' .. (day_number - 1) .. ':'
  local ends = {{'p' .. pre, suf}, {'s' .. suf, pre}}
  local accounts, others, swept = 0, 0, 0
  for _, e in ipairs(ends) do
    local a = window(':acct', yesterday, e[1], add(':acct', day, e[1], id))
    local o = window(':ends', yesterday, e[1], add(':ends', day, e[1], e[2]))
    if a >= swept_by and 2 * o >= a then swept = 1 end
    if a > accounts or (a == accounts and o > others) then accounts, others = a, o end
  end
  local network_accounts = window(':net', yesterday, network, add(':net', day, network, id))
  local pair = pre .. suf  -- both ends: the prompt word for word, as far as the engine reads it
  local asked_by = window(':ask', yesterday, pair, add(':ask', day, pair, id, popular_by))
  if asked_by >= popular_by then swept = 0 end  -- a popular prompt: no sweep's fill
  sw = sw * factor + swept

  -- the recent prompts' ends, oldest first: this one's join, the oldest goes beyond `recent`
  recent_ends = recent_ends .. new_ends
  if recent_kept >= recent then
    recent_ends = string.sub(recent_ends, ENDS_BYTES + 1)
  else
    recent_kept = recent_kept + 1
  end
  local variety = 1
  if recent_kept >= recent then
    local hashes = {struct.unpack(RING, recent_ends)}
    variety = math.min(distinct_share(hashes, 0), distinct_share(hashes, 1))
  end

  redis.call('HSET', kk, prefix_field, fmt(p_count), suffix_field, fmt(s_count))
  if kept > 2 * max_skeletons then kept = trim(kk) end
  redis.call('EXPIRE', kk, ttl)
  local values = {t, n, rs, pr, um, sw, lm, lv, gm, gv, gn, base, top, kept}
  for h = 1, 24 do values[14 + h] = hours[h] end
  values[STATE_SIZE] = recent_kept
  redis.call('SET', ik, struct.pack(STATE, unpack(values)) .. recent_ends, 'EX', ttl)
  local gaps = -1
  if gn >= 2 then gaps = math.sqrt(math.max(gv, 0)) end
  out[#out + 1] = struct.pack(ROW, n, top / grow / n, sw / n, sw, accounts, others, rs / n, pr, um / n,
    math.sqrt(math.max(lv, 0)), gaps, network_accounts, quiet_share(hours), variety)
end
return out
