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
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local period, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local slice, slimit = tonumber(ARGV[3]), tonumber(ARGV[4]) / 1000
local hits, force = tonumber(ARGV[5]), ARGV[6] == '1'
local h = redis.call('HMGET', KEYS[1], 'pw', 'pc', 'pp', 'sw', 'sc', 'sp')

-- The counts of the window `now` is in and of the one before, the window's number and how
-- far into it `now` is (0..1).
local function roll(win, w0, c0, p0)
  local w = math.floor(now / win)
  local f = (now % win) / win
  w0, c0, p0 = tonumber(w0), tonumber(c0) or 0, tonumber(p0) or 0
  if w0 == w then return c0, p0, w, f end
  if w0 == w - 1 then return 0, c0, w, f end
  return 0, 0, w, f
end

-- Milliseconds until previous * (1 - g) + current drops below lim, with no more hits.
local function wait(c, p, f, win, lim)
  if c >= lim then
    -- Only once this window is the previous one and has faded enough.
    return (1 - f) * win + (1 - lim / c) * win
  end
  if p <= 0 then return 0 end
  local g = 1 - (lim - c) / p
  if g <= f then return 0 end
  return (g - f) * win
end

local pc, pp, pw, pf = roll(period, h[1], h[2], h[3])
local sc, sp, sw, sf = roll(slice, h[4], h[5], h[6])
local pe = pp * (1 - pf) + pc
local se = sp * (1 - sf) + sc

if force or (pe < limit and se < slimit) then
  pc, sc = pc + hits, sc + hits
  redis.call('HSET', KEYS[1], 'pw', pw, 'pc', pc, 'pp', pp, 'sw', sw, 'sc', sc, 'sp', sp)
  redis.call('PEXPIRE', KEYS[1], period * 2)
  local rem = math.floor(limit - pe - hits)
  if rem < 0 then rem = 0 end
  return {1, rem, math.ceil((1 - pf) * period), math.floor(pe + hits), math.floor(se + hits)}
end

local retry = 0
if pe >= limit then retry = wait(pc, pp, pf, period, limit) end
if se >= slimit then
  local r = wait(sc, sp, sf, slice, slimit)
  if r > retry then retry = r end
end
return {0, 0, math.ceil(retry), math.floor(pe), math.floor(se)}
