-- A batch of risk observations, atomically: update each identity's decayed signals and the cross-account
-- sets, and return each observation's signals. gateway/risk/signals.py (MemorySignals) holds the same
-- arithmetic for memory storage; a test runs both on the same traffic and requires the same numbers.
--
-- A call into Redis costs a script one or two microseconds, so the script makes few: an identity's state
-- (running statistics, hour counts, recent ends: one packed string) and its skeleton counts are one hash,
-- read with one HMGET and written with one HSET (and, once a day, an EXPIRE), and each cross-account set
-- is added to and counted in two to four calls. What reads one identity's state alone (its quiet share,
-- its variety) is left to the replicas, which are many, where the script runs on one server.
--
-- Every key starts with KEYS[1], a prefix carrying one hash tag, so on a Cluster all live in its slot.
-- ARGV: tau seconds, max skeletons, swept-by accounts, identity ttl seconds, rebase-at, max set members,
--       popular-by accounts, recent prompts kept, words per end, then the observations packed in one string (see RECORD): one
--       argument, not eleven per observation, because the client spent more time encoding arguments than the
--       script spent reading them.
-- Returns per observation one string: twelve little-endian doubles (requests, concentration, swept share, swept
--   requests, template accounts, template variants, reasoning share, probes, unmarked share, length spread,
--   timing spread (-1: fewer than two gaps), network accounts), then the identity's state as stored, whose
--   hour counts and recent ends redis_signals.py reads the quiet share and the variety from.

local root, tau, max_skeletons = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local swept_by, ttl, rebase_at = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local max_members, popular_by = tonumber(ARGV[6]), tonumber(ARGV[7])
local recent, end_words = tonumber(ARGV[8]), tonumber(ARGV[9])
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
-- name is root .. kind .. day .. key, where kind (':own') and day (':20400:') carry their colons: made once.
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

-- An identity's hash holds its skeleton counts (fields 'p' or 's' and the skeleton's hash) and, in field
-- STATE_FIELD, its running state, hour counts and recent prompts' ends: 39 doubles, then the recent prompts'
-- openings (oldest first, as many as the 39th says), then their closings. The script never reads the ends:
-- each prompt's come in the record as bytes (END_WORDS two-byte word hashes) and are appended, the oldest cut
-- off. One hash, not a string beside a hash: about 11% less script time and 8% more memory on the
-- benchmark's traffic (a state of over 64 bytes takes the hash out of Redis's compact encoding).
local STATE_FIELD = '='
local STATE_SIZE = 39
local END_BYTES = 2 * end_words
local STATE = '<' .. string.rep('d', STATE_SIZE)
local STATE_BYTES = 8 * STATE_SIZE
local ROW = '<' .. string.rep('d', 12)
-- one observation: identity, prefix hash, suffix hash, network (each a 4-byte length and its bytes), time,
-- words, the reasoning, probe and unmarked flags, its opening's and its closing's word hashes
-- (redis_signals.py packs it)
local RECORD = '<I4c0I4c0I4c0I4c0I4c0I4c0dI4BBBc' .. END_BYTES .. 'c' .. END_BYTES

-- The identity's skeleton counts, as {name, count} pairs.
local function skeleton_counts(key)
  local flat = redis.call('HGETALL', key)
  local names = {}
  for j = 1, #flat, 2 do
    if flat[j] ~= STATE_FIELD then names[#names + 1] = {flat[j], tonumber(flat[j + 1])} end
  end
  return names
end

-- Bring the skeleton counts back to scale 1 before they overflow.
local function rebase(key, grow)
  for _, e in ipairs(skeleton_counts(key)) do redis.call('HSET', key, e[1], fmt(e[2] / grow)) end
end

-- Keep the max_skeletons largest skeleton counts; returns how many are kept.
local function trim(key)
  local names = skeleton_counts(key)
  -- largest first; equal counts by name, so that the same ones go as in MemorySignals (whose sort is stable
  -- where Lua's is not, over an order HGETALL does not fix)
  table.sort(names, function(a, b) return a[2] > b[2] or (a[2] == b[2] and a[1] > b[1]) end)
  for j = max_skeletons + 1, #names do redis.call('HDEL', key, names[j][1]) end
  return math.min(#names, max_skeletons)
end

local batch, at = ARGV[10], 1
while at <= #batch do
  local id, pre, suf, network, owner, message, t, words, reasoning, probe, unmarked, opening, closing
  id, pre, suf, network, owner, message, t, words, reasoning, probe, unmarked, opening, closing, at =
    struct.unpack(RECORD, batch, at)
  -- the key names the layout: ':st:' and ':sk:', an earlier one (whose ring interleaved the two ends), are
  -- never read and expire; a new layout needs a new name, since the length check below cannot tell all apart
  local key = root .. ':id:' .. id
  local prefix_field, suffix_field = 'p' .. pre, 's' .. suf
  local stored = redis.call('HMGET', key, STATE_FIELD, prefix_field, suffix_field)
  local packed = stored[1]
  local st = {}
  local ends = ''
  if packed and #packed >= STATE_BYTES then
    st = {struct.unpack(STATE, packed)}
    ends = string.sub(packed, STATE_BYTES + 1)
  end
  -- new, idle for ttl (by the observations' clock, as MemorySignals; Redis expires it by its own), or not
  -- whole: start afresh, skeleton counts included
  local kept_ends = st[STATE_SIZE]
  if not kept_ends or t - st[1] > ttl or kept_ends > recent or #ends ~= 2 * kept_ends * END_BYTES then
    st, ends = {}, ''
    for j = 1, STATE_SIZE do st[j] = 0 end
    st[12] = t  -- the skeleton counts' scale is 1 now
    stored = {false, false, false}
    redis.call('DEL', key)
  end
  local last, n, rs, pr, um, sw = st[1], st[2], st[3], st[4], st[5], st[6]
  local lm, lv, gm, gv, gn = st[7], st[8], st[9], st[10], st[11]
  local base, top, kept, recent_kept = st[12], st[13], st[14], st[39]
  -- its expiry is renewed on the identity's first write of a day (a new state's included), not on every
  -- write (a call saved per observation); a day past ttl, so that it outlives its last write by ttl
  local renew = n == 0 or floor_div(t, DAY) ~= floor_div(last, DAY)
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

  -- counts per skeleton and per hour of the day (st[15] to st[38]), on a growing scale (see
  -- MemorySignals._count_skeletons)
  local p_count, s_count = num(stored[2]), num(stored[3])
  local grow = math.exp((t - base) / tau)
  if grow > rebase_at then
    rebase(key, grow)
    for h = 15, 38 do st[h] = st[h] / grow end
    p_count, s_count = p_count / grow, s_count / grow
    top, base, grow = top / grow, t, 1
  end
  local hour = floor_div(t, 3600) % 24 + 15
  st[hour] = st[hour] + grow
  if stored[2] == false then kept = kept + 1 end
  if stored[3] == false then kept = kept + 1 end
  p_count, s_count = p_count + grow, s_count + grow
  top = math.max(top, p_count, s_count)

  -- across accounts: whose (owners: a tenant's accounts are one) used each skeleton, with which fills; who
  -- came from the network. Key names are root .. ':kind:' .. day .. ':' .. key; the day parts are made once
  -- per observation. The kinds ':own', ':fill' and ':msg' replaced ':acct', ':ends' and ':ask', whose members
  -- meant accounts and other ends: never read, they expire
  local day_number = floor_div(t, DAY)
  local day, yesterday = ':' .. day_number .. ':', ':' .. (day_number - 1) .. ':'
  local accounts, others, swept = 0, 0, 0
  local sides = 3  -- each skeleton (the opening, the closing, both) and its fill (the other end; the message)
  if pre == suf then sides = 2 end  -- a message too short to have two ends is its one skeleton
  for side = 1, sides do
    local skeleton, fill = prefix_field, suf
    if side == 2 then skeleton, fill = suffix_field, pre end
    if side == 3 then skeleton, fill = 'b' .. pre .. suf, message end
    local a = window(':own', yesterday, skeleton, add(':own', day, skeleton, owner))
    local o = window(':fill', yesterday, skeleton, add(':fill', day, skeleton, fill))
    if a >= swept_by and 2 * o >= a then swept = 1 end
    if a > accounts or (a == accounts and o > others) then accounts, others = a, o end
  end
  local network_accounts = window(':net', yesterday, network, add(':net', day, network, id))
  -- who sent the message word for word, which matters only to a sweep's fill: a popular prompt is none.
  -- Yesterday's askers are read only then (a call saved for most observations).
  local asked_by = add(':msg', day, message, owner, popular_by)
  if swept == 1 and window(':msg', yesterday, message, asked_by) >= popular_by then swept = 0 end
  sw = sw * factor + swept

  -- the recent prompts' openings and closings, oldest first: this one's join, the oldest go beyond `recent`
  local split = recent_kept * END_BYTES
  local openings, closings = string.sub(ends, 1, split) .. opening, string.sub(ends, split + 1) .. closing
  if recent_kept >= recent then
    openings, closings = string.sub(openings, END_BYTES + 1), string.sub(closings, END_BYTES + 1)
  else
    recent_kept = recent_kept + 1
  end

  local counts = {prefix_field, fmt(p_count), suffix_field, fmt(s_count)}
  if kept > 2 * max_skeletons then  -- seldom: this request's counts go in first, to be trimmed with the rest
    redis.call('HSET', key, unpack(counts))
    kept, counts = trim(key), {}
  end
  st[1], st[2], st[3], st[4], st[5], st[6], st[7], st[8], st[9], st[10] = t, n, rs, pr, um, sw, lm, lv, gm, gv
  st[11], st[12], st[13], st[14], st[STATE_SIZE] = gn, base, top, kept, recent_kept
  local state = struct.pack(STATE, unpack(st, 1, STATE_SIZE)) .. openings .. closings
  redis.call('HSET', key, STATE_FIELD, state, unpack(counts))
  if renew then redis.call('EXPIRE', key, ttl + DAY) end
  local gaps = -1
  if gn >= 2 then gaps = math.sqrt(math.max(gv, 0)) end
  out[#out + 1] = struct.pack(ROW, n, top / grow / n, sw / n, sw, accounts, others, rs / n, pr, um / n,
    math.sqrt(math.max(lv, 0)), gaps, network_accounts) .. state
end
return out
