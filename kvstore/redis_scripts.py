"""The Lua scripts of the Redis backend (``kvstore.redis_backend``), one job each.

Every script touches only the metadata keys, which share one hash tag and so one slot: each
runs atomically on that slot's primary. The keys are passed in the fixed order of
``META_KEYS`` (``KEYS[2i-1]``/``KEYS[2i]``: the values hash and the key index of metadata space
``i``, then the fixed keys below).

Multi-version reads. Every commit ``C`` (an integer, ``commit``) records, for each key it
changes, an *undo entry* ``undo[member]`` with the value the key had before and the commit that
wrote that value, where ``member`` = 20-digit ``C`` .. ":" .. space letter .. key, also indexed by
commit in ``log``; ``mod[field]`` is the last commit that changed a key. A reader at snapshot
``v`` takes the current value when ``mod <= v`` and otherwise walks the undo chain back to the
value at ``v``. Undo entries are trimmed after a retention period (``trim``); a reader older
than that is told its snapshot is too old (status 0) and retries.
"""
from __future__ import annotations

# metadata spaces in script order (blocks live outside the metadata slot)
META_SPACES = ("sessions", "refs", "ttl", "meta", "aux", "usage", "staged")
FIXED_KEYS = ("mod", "log", "undo", "commit", "ctimes", "trimmed", "doomed", "sweeps", "claims", "done")


def space_letter(space: str) -> bytes:
    return bytes([65 + META_SPACES.index(space)])


_PRELUDE = """
local NS = %d
local function K(name) return KEYS[2 * NS + name] end
local MOD, LOG, UNDO, COMMIT, CTIMES, TRIMMED, DOOMED, SWEEPS, CLAIMS, DONE = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
local function vhash(letter) return KEYS[2 * (string.byte(letter) - 64) - 1] end
local function zindex(letter) return KEYS[2 * (string.byte(letter) - 64)] end
local function too_old(v) return v < tonumber(redis.call('GET', K(TRIMMED)) or '0') end
""" % len(META_SPACES)

# ARGV: field (letter .. key), key, v  ->  {1, exists, value} | {0} (snapshot too old)
SNAPSHOT_GET = _PRELUDE + """
local field, key, v = ARGV[1], ARGV[2], tonumber(ARGV[3])
local m = redis.call('HGET', K(MOD), field)
if (not m) or tonumber(m) <= v then
  local value = redis.call('HGET', vhash(string.sub(field, 1, 1)), key)
  if value then return {1, 1, value} end
  return {1, 0, ''}
end
if too_old(v) then return {0} end
local c = tonumber(m)
while true do
  local u = redis.call('HGET', K(UNDO), string.format('%020d', c) .. ':' .. field)
  if not u then return {0} end
  local prev = tonumber(string.sub(u, 2, 21))
  if prev <= v then
    if string.sub(u, 1, 1) == '1' then return {1, 1, string.sub(u, 22)} end
    return {1, 0, ''}
  end
  c = prev
end
"""

# ARGV: letter, v, seen, lex min, lex max, limit, want values ('1'/'0')
# -> {0} | {1, now, n, key1, value1, ..., m, key, existed, value, ...}: the page of current keys
# and, for commits in (seen, now] of this space, each change's key with its value before it
SNAPSHOT_PAGE = _PRELUDE + """
local letter, v, seen = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if too_old(v) then return {0} end
local now = tonumber(redis.call('GET', K(COMMIT)) or '0')
local keys = redis.call('ZRANGEBYLEX', zindex(letter), ARGV[4], ARGV[5], 'LIMIT', 0, tonumber(ARGV[6]))
local out = {1, now, #keys}
local values = nil
if ARGV[7] == '1' and #keys > 0 then values = redis.call('HMGET', vhash(letter), unpack(keys)) end
for i, key in ipairs(keys) do
  out[#out + 1] = key
  out[#out + 1] = (values and values[i]) or ''
end
local changes = {}
if now > seen then
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', K(LOG), '(' .. seen, now)) do
    if string.sub(member, 22, 22) == letter then
      local u = redis.call('HGET', K(UNDO), member)
      if not u then return {0} end
      changes[#changes + 1] = string.sub(member, 23)
      changes[#changes + 1] = string.sub(u, 1, 1)
      changes[#changes + 1] = string.sub(u, 22)
    end
  end
end
out[#out + 1] = #changes / 3
for _, item in ipairs(changes) do out[#out + 1] = item end
return out
"""

# ARGV: letter, v -> {0} | {1, entries at v}
SNAPSHOT_COUNT = _PRELUDE + """
local letter, v = ARGV[1], tonumber(ARGV[2])
if too_old(v) then return {0} end
local count = redis.call('ZCARD', zindex(letter))
local seen = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', K(LOG), '(' .. v, '+inf')) do
  if string.sub(member, 22, 22) == letter then
    local key = string.sub(member, 23)
    if not seen[key] then
      seen[key] = true
      local u = redis.call('HGET', K(UNDO), member)
      if not u then return {0} end
      local before = (string.sub(u, 1, 1) == '1') and 1 or 0
      local after = redis.call('HEXISTS', vhash(letter), key)
      count = count + before - after
    end
  end
end
return {1, count}
"""

# ARGV: v, now_ms, token, nreads, fields..., nscans, (letter .. prefix)..., nepochs, (chunk, epoch)...,
#       nwrites, (field, op 'p'|'d', value)..., ndooms, block keys...
# -> {1, commit} | {0, why} (a conflict: run the transaction again) | {2} (a chunk is being swept: wait)
# An epoch of 'even' asks only that no sweep of the chunk is in progress.
COMMIT = _PRELUDE + """
local v, now, token = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local done = redis.call('ZSCORE', K(DONE), token)
if done then return {1, tonumber(done)} end
if too_old(v) then return {0, 'snapshot'} end
local at = 4
local nreads = tonumber(ARGV[at]); at = at + 1
for i = 1, nreads do
  local m = redis.call('HGET', K(MOD), ARGV[at])
  if m and tonumber(m) > v then return {0, 'read'} end
  at = at + 1
end
local nscans = tonumber(ARGV[at]); at = at + 1
local current = tonumber(redis.call('GET', K(COMMIT)) or '0')
if nscans > 0 and current > v then
  local members = redis.call('ZRANGEBYSCORE', K(LOG), '(' .. v, '+inf')
  for i = 0, nscans - 1 do
    local p = ARGV[at + i]
    for _, member in ipairs(members) do
      if string.sub(member, 22, 21 + #p) == p then return {0, 'scan'} end
    end
  end
end
at = at + nscans
local nepochs = tonumber(ARGV[at]); at = at + 1
for i = 1, nepochs do
  local epoch = tonumber(redis.call('HGET', K(SWEEPS), ARGV[at]) or '0')
  local want = ARGV[at + 1]
  if epoch % 2 == 1 or (want ~= 'even' and epoch ~= tonumber(want)) then return {2} end
  at = at + 2
end
local nwrites = tonumber(ARGV[at]); at = at + 1
local ndooms = tonumber(ARGV[at + 3 * nwrites])
if nwrites == 0 and ndooms == 0 then return {1, current} end
local c = redis.call('INCR', K(COMMIT))
local cs = string.format('%020d', c)
for i = 1, nwrites do
  local field, op, value = ARGV[at], ARGV[at + 1], ARGV[at + 2]
  local letter, key = string.sub(field, 1, 1), string.sub(field, 2)
  local prior = redis.call('HGET', vhash(letter), key)
  local prev = tonumber(redis.call('HGET', K(MOD), field) or '0')
  local member = cs .. ':' .. field
  redis.call('HSET', K(UNDO), member, (prior and '1' or '0') .. string.format('%020d', prev) .. (prior or ''))
  redis.call('ZADD', K(LOG), c, member)
  redis.call('HSET', K(MOD), field, c)
  if op == 'p' then
    redis.call('HSET', vhash(letter), key, value)
    redis.call('ZADD', zindex(letter), 0, key)
  else
    redis.call('HDEL', vhash(letter), key)
    redis.call('ZREM', zindex(letter), key)
  end
  at = at + 3
end
at = at + 1
for i = 1, ndooms do
  redis.call('ZADD', K(DOOMED), now, ARGV[at])
  at = at + 1
end
redis.call('ZADD', K(CTIMES), now, c)
redis.call('ZADD', K(DONE), c, token)
return {1, c}
"""

# ARGV: cutoff_ms, limit -> number of commits whose undo entries were dropped
TRIM = _PRELUDE + """
local commits = redis.call('ZRANGEBYSCORE', K(CTIMES), '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local highest = tonumber(redis.call('GET', K(TRIMMED)) or '0')
for _, cs in ipairs(commits) do
  local c = tonumber(cs)
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', K(LOG), c, c)) do
    redis.call('HDEL', K(UNDO), member)
    local field = string.sub(member, 22)
    if redis.call('HGET', K(MOD), field) == tostring(c) and redis.call('HEXISTS', vhash(string.sub(field, 1, 1)), string.sub(field, 2)) == 0 then
      redis.call('HDEL', K(MOD), field)
    end
  end
  redis.call('ZREMRANGEBYSCORE', K(LOG), c, c)
  redis.call('ZREM', K(CTIMES), cs)
  if c > highest then highest = c end
end
if #commits > 0 then
  redis.call('SET', K(TRIMMED), highest)
  redis.call('ZREMRANGEBYSCORE', K(DONE), '-inf', highest)
end
return #commits
"""

# ARGV: cutoff_ms (doomed before it may go), now_ms, stale_ms (claims older are redone), limit,
#       chunk key bytes
# -> block keys to delete now: each was doomed before the cutoff and its chunk is neither
# referenced nor staged. Their chunks' sweep epochs turn odd (no commit that writes the chunk
# goes through until ``FINISH_SWEEP``); claims left by a sweeper that died are handed out again.
CLAIM_SWEEP = _PRELUDE + """
local chunk_bytes = tonumber(ARGV[5])
local out = {}
for _, key in ipairs(redis.call('ZRANGEBYSCORE', K(CLAIMS), '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))) do
  out[#out + 1] = key
  redis.call('ZADD', K(CLAIMS), ARGV[2], key)
end
local claimed = {}
for _, key in ipairs(redis.call('ZRANGEBYSCORE', K(DOOMED), '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[4]))) do
  redis.call('ZREM', K(DOOMED), key)
  local chunk = string.sub(key, 1, chunk_bytes)
  local refs, staged = vhash('B'), zindex('G')
  local live = redis.call('HEXISTS', refs, chunk) == 1
  if not live then
    local next_staged = redis.call('ZRANGEBYLEX', staged, '[' .. chunk, '+', 'LIMIT', 0, 1)[1]
    live = next_staged ~= nil and string.sub(next_staged, 1, chunk_bytes) == chunk
  end
  if not live then
    local epoch = tonumber(redis.call('HGET', K(SWEEPS), chunk) or '0')
    if epoch % 2 == 0 then redis.call('HINCRBY', K(SWEEPS), chunk, 1) end
    redis.call('ZADD', K(CLAIMS), ARGV[2], key)
    out[#out + 1] = key
  end
end
return out
"""

# ARGV: chunk key bytes, block keys deleted -> chunks whose sweep ended (epoch even again)
FINISH_SWEEP = _PRELUDE + """
local chunk_bytes = tonumber(ARGV[1])
local chunks = {}
for i = 2, #ARGV do
  redis.call('ZREM', K(CLAIMS), ARGV[i])
  chunks[string.sub(ARGV[i], 1, chunk_bytes)] = true
end
local ended = 0
for chunk, _ in pairs(chunks) do
  local still = redis.call('ZRANGEBYLEX', K(CLAIMS), '[' .. chunk, '+', 'LIMIT', 0, 1)[1]
  if not (still and string.sub(still, 1, chunk_bytes) == chunk) then
    local epoch = tonumber(redis.call('HGET', K(SWEEPS), chunk) or '0')
    if epoch % 2 == 1 then redis.call('HINCRBY', K(SWEEPS), chunk, 1) end
    ended = ended + 1
  end
end
return ended
"""

# ARGV: now_ms, chunk key bytes, block keys found on the nodes -> how many were marked doomed
# (each block whose chunk is neither referenced nor staged and that is not doomed already)
MARK_ORPHANS = _PRELUDE + """
local chunk_bytes = tonumber(ARGV[2])
local marked = 0
for i = 3, #ARGV do
  local key = ARGV[i]
  local chunk = string.sub(key, 1, chunk_bytes)
  if redis.call('HEXISTS', vhash('B'), chunk) == 0 and not redis.call('ZSCORE', K(DOOMED), key) then
    local next_staged = redis.call('ZRANGEBYLEX', zindex('G'), '[' .. chunk, '+', 'LIMIT', 0, 1)[1]
    if not (next_staged and string.sub(next_staged, 1, chunk_bytes) == chunk) then
      redis.call('ZADD', K(DOOMED), ARGV[1], key)
      marked = marked + 1
    end
  end
end
return marked
"""
