-- Sliding-window rate limiting for one key, the same rule as the gateway's local limiter:
-- at most LIMIT in any PERIOD and SLICE_LIMIT in any SLICE, each estimated from two
-- aligned windows as previous * (1 - elapsed) + current. One key (a hash), so the script
-- runs on one Redis Cluster slot whatever the key is. Redis' own clock: replicas with
-- skewed clocks still count in the same windows.
--
-- KEYS[1]  the counted key
-- ARGV     period_ms, limit, slice_ms, slice_limit (thousandths), hits, force (1: count the
--          hits even over the limit: hits an approximate-mode replica already let through)
-- Returns  {ok, remaining, ms (refused: until there is room; else until the period's
--          window moves), the period's count, the slice's count}
--
-- It runs once per request: it writes only the fields that changed, sets the expiry only
-- when the period's window moves, and defines no function (Redis' CPU per call: 24 µs for a
-- first version that did all three, measured with redis-benchmark).
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local period, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local slice, slimit = tonumber(ARGV[3]), tonumber(ARGV[4]) / 1000
local hits = tonumber(ARGV[5])
local h = redis.call('HMGET', KEYS[1], 'pw', 'pc', 'pp', 'sw', 'sc', 'sp')

-- The period: the counts of the window `now` is in and of the one before.
local pw = math.floor(now / period)
local pf = (now % period) / period
local pw0 = tonumber(h[1])
local pc, pp, prot = 0, 0, true
if pw0 == pw then
  pc, pp, prot = tonumber(h[2]) or 0, tonumber(h[3]) or 0, false
elseif pw0 == pw - 1 then
  pp = tonumber(h[2]) or 0
end
-- The slice, likewise.
local sw = math.floor(now / slice)
local sf = (now % slice) / slice
local sw0 = tonumber(h[4])
local sc, sp, srot = 0, 0, true
if sw0 == sw then
  sc, sp, srot = tonumber(h[5]) or 0, tonumber(h[6]) or 0, false
elseif sw0 == sw - 1 then
  sp = tonumber(h[5]) or 0
end
local pe = pp * (1 - pf) + pc
local se = sp * (1 - sf) + sc

if ARGV[6] == '1' or (pe < limit and se < slimit) then
  pc, sc = pc + hits, sc + hits
  if prot and srot then
    redis.call('HSET', KEYS[1], 'pw', pw, 'pc', pc, 'pp', pp, 'sw', sw, 'sc', sc, 'sp', sp)
  elseif prot then
    redis.call('HSET', KEYS[1], 'pw', pw, 'pc', pc, 'pp', pp, 'sc', sc)
  elseif srot then
    redis.call('HSET', KEYS[1], 'pc', pc, 'sw', sw, 'sc', sc, 'sp', sp)
  else
    redis.call('HSET', KEYS[1], 'pc', pc, 'sc', sc)
  end
  -- Two periods after the period's window last moved: a key nobody hits goes away.
  if prot then redis.call('PEXPIRE', KEYS[1], period * 2) end
  local rem = math.floor(limit - pe - hits)
  if rem < 0 then rem = 0 end
  return {1, rem, math.ceil((1 - pf) * period), math.floor(pe + hits), math.floor(se + hits)}
end

-- Refused: when does room come back? For each window over its limit, the time until
-- previous * (1 - g) + current drops below it with no more hits.
local retry = 0
if pe >= limit then
  if pc >= limit then
    -- Only once this window is the previous one and has faded enough.
    retry = (1 - pf) * period + (1 - limit / pc) * period
  elseif pp > 0 then
    local g = 1 - (limit - pc) / pp
    if g > pf then retry = (g - pf) * period end
  end
end
if se >= slimit then
  local r = 0
  if sc >= slimit then
    r = (1 - sf) * slice + (1 - slimit / sc) * slice
  elseif sp > 0 then
    local g = 1 - (slimit - sc) / sp
    if g > sf then r = (g - sf) * slice end
  end
  if r > retry then retry = r end
end
return {0, 0, math.ceil(retry), math.floor(pe), math.floor(se)}
