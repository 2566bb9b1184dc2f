"""Lua scripts: each runs atomically in Redis. Every one is tested on the real server too.

Cluster safety: every script touches the keys of one hash tag only (a job's `{id}` keys,
a client's list, or the statistics hash and its batch markers), so each runs in one slot.

A job has four keys: the entry (the job's JSON, exactly the bytes the API sends; an empty
string is a tombstone, "no such job"), its seal, its fill lease, and its version floor,
a hash {inc, ver, rev} that outlives the entry: `inc` is the database incarnation the
version belongs to, `ver` the newest version this Redis has stored, `rev` counts the
writes and invalidations that revoked fill leases (a fill carries the `rev` it saw when it
took the lease). README "The cache and its guarantees" explains the rules.
"""

from __future__ import annotations

# Read a job entry and its seal; on a miss, try to take the lease.
# An entry whose floor names another database incarnation is a miss (the fill replaces it).
# The lease is re-entrant for its token.
# KEYS: entry, lease, seal, floor   ARGV: lease token, lease ms, incarnation
# Returns {0, value, seal} hit (value '' is a tombstone) · {1, rev} miss, lease granted
# (go fill) · {2, pttl} miss, another reader fills; its lease ends in pttl ms.
READ_JOB = """
local v = redis.call('GET', KEYS[1])
if v then
  local inc = redis.call('HGET', KEYS[4], 'inc')
  if (not inc) or inc == ARGV[3] then
    return {0, v, redis.call('GET', KEYS[3])}
  end
end
local holder = redis.call('GET', KEYS[2])
if holder == ARGV[1] or ((not holder) and redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])) then
  return {1, redis.call('HGET', KEYS[4], 'rev') or '0'}
end
return {2, redis.call('PTTL', KEYS[2])}
"""

# READ_JOB for several jobs in one call (the asyncio reader batches the reads that arrive
# within one event-loop tick). Each job is read exactly as READ_JOB reads it; an error on
# one job's keys (e.g. WRONGTYPE) is that job's answer only, never the others'.
# KEYS: entry, lease, seal, floor of job 1, then of job 2, ...
# ARGV: lease ms, incarnation, lease token of job 1, of job 2, ...
# Returns one READ_JOB answer per job, or {3, error message} for a job whose read failed.
READ_JOBS = """
local out = {}
for i = 1, #ARGV - 2 do
  local k = (i - 1) * 4
  local ok, r = pcall(function()
    local v = redis.call('GET', KEYS[k + 1])
    if v then
      local inc = redis.call('HGET', KEYS[k + 4], 'inc')
      if (not inc) or inc == ARGV[2] then
        return {0, v, redis.call('GET', KEYS[k + 3])}
      end
    end
    local holder = redis.call('GET', KEYS[k + 2])
    if holder == ARGV[i + 2] or
        ((not holder) and redis.call('SET', KEYS[k + 2], ARGV[i + 2], 'PX', ARGV[1])) then
      return {1, redis.call('HGET', KEYS[k + 4], 'rev') or '0'}
    end
    return {2, redis.call('PTTL', KEYS[k + 2])}
  end)
  if ok then
    out[i] = r
  elseif type(r) == 'table' and r.err then
    out[i] = {3, r.err}
  else
    out[i] = {3, tostring(r)}
  end
end
return out
"""

# A reader's fill after its DB read, with or without its lease still held (a late fill,
# after a DB read slower than the lease, is fine). Stored when no write or invalidation
# revoked the lease since it was taken (rev), and the
# version is not older than the floor of the same incarnation (equal only if the entry is
# gone). Version 0 with an empty value stores a tombstone, which never sets the floor.
# KEYS: entry, lease, seal, floor
# ARGV: version, value, ttl seconds, token, seal, incarnation, rev, floor ttl seconds
# A value of another Redis type at the entry fails the script (WRONGTYPE) before any
# change: it is reported, dropped and counted, never silently overwritten.
# Returns 1 stored · 0 refused.
FILL_JOB = """
redis.call('GET', KEYS[1])
if redis.call('GET', KEYS[2]) == ARGV[4] then redis.call('DEL', KEYS[2]) end
local f = redis.call('HMGET', KEYS[4], 'inc', 'ver', 'rev')
if (f[3] or '0') ~= ARGV[7] then return 0 end
local version = tonumber(ARGV[1])
if f[1] == ARGV[6] then
  local fv = tonumber(f[2])
  if fv and (fv > version or (fv == version and redis.call('EXISTS', KEYS[1]) == 1)) then
    return 0
  end
end
if version == 0 and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[3])
if version > 0 then
  redis.call('HSET', KEYS[4], 'inc', ARGV[6], 'ver', ARGV[1])
  redis.call('EXPIRE', KEYS[4], ARGV[8])
end
return 1
"""

# A writer's pre-warm after its DB commit: revoke any outstanding fill lease (rev + 1), store
# the version unless the floor of the same incarnation is newer (or equal with the entry
# present), and publish exactly what was stored, so subscribers see versions in order.
# KEYS: entry, lease, seal, floor
# ARGV: version, value, ttl seconds, seal, incarnation, floor ttl seconds, channel
# Returns 1 stored (and published) · 0 refused.
WRITE_JOB = """
redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[2])
local f = redis.call('HMGET', KEYS[4], 'inc', 'ver')
redis.call('HINCRBY', KEYS[4], 'rev', 1)
redis.call('EXPIRE', KEYS[4], ARGV[6])
local version = tonumber(ARGV[1])
if f[1] == ARGV[5] then
  local fv = tonumber(f[2])
  if fv and (fv > version or (fv == version and redis.call('EXISTS', KEYS[1]) == 1)) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[3])
redis.call('HSET', KEYS[4], 'inc', ARGV[5], 'ver', ARGV[1])
redis.call('PUBLISH', ARGV[7], ARGV[2])
return 1
"""

# Drop a job's entry, seal and fill lease. With ARGV[1] = '1' (an invalidation) also
# revoke fills in flight (rev + 1); a bad entry is dropped without that (the floor keeps
# what the entry proved). The floor stays.
# KEYS: entry, lease, seal, floor   ARGV: revoke ('1' or '0'), floor ttl seconds
DROP_JOB = """
local n = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
if ARGV[1] == '1' then
  redis.call('HINCRBY', KEYS[4], 'rev', 1)
  redis.call('EXPIRE', KEYS[4], ARGV[2])
end
return n
"""

# Read one page of a client's job list. The hash carries an epoch; invalidation is a
# DEL of the hash, so a filler that read the epoch before it cannot write after it.
# A page's seal is the field '_seal:<page>' of the same hash.
# KEYS: list hash   ARGV: page field, fresh epoch token, ttl seconds
# Returns {epoch, value, seal} hit · {epoch} miss.
READ_LIST = """
local r = redis.call('HMGET', KEYS[1], ARGV[1], '_epoch', '_seal:' .. ARGV[1])
local epoch = r[2]
if not epoch then
  epoch = ARGV[2]
  redis.call('HSET', KEYS[1], '_epoch', epoch)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
if r[1] then
  return {epoch, r[1], r[3]}
end
return {epoch}
"""

# Fill one page if the list was not invalidated since the epoch was read.
# KEYS: list hash   ARGV: epoch, page field, value, seal
FILL_LIST = """
if redis.call('HGET', KEYS[1], '_epoch') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3], '_seal:' .. ARGV[2], ARGV[4])
return 1
"""

# Add one batch of counts to the statistics hash, once: the batch marker is set only
# with the counts, so a batch re-sent after an ambiguous timeout is not counted twice.
# A counter that is not an integer (bad data) is reset to 0 first, and `since` (the
# Redis server's time when the counters started) is reset with it, so the loss shows.
# KEYS: stats hash, batch marker   ARGV: marker ttl seconds, field1, amount1, ...
# Returns {1 counted | 0 already counted, number of counters reset}.
FLUSH_STATS = """
local reset = 0
local now = redis.call('TIME')[1]
for i = 2, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur and not string.match(cur, '^-?%d+$') then
    redis.call('HSET', KEYS[1], ARGV[i], '0', 'since', now)
    reset = reset + 1
  end
end
redis.call('HSETNX', KEYS[1], 'since', now)
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then return {0, reset} end
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
return {1, reset}
"""

ALL = {
    "read_job": READ_JOB,
    "read_jobs": READ_JOBS,
    "fill_job": FILL_JOB,
    "write_job": WRITE_JOB,
    "drop_job": DROP_JOB,
    "read_list": READ_LIST,
    "fill_list": FILL_LIST,
    "flush_stats": FLUSH_STATS,
}
