"""Lua scripts: each runs atomically in Redis. Every one is tested on the real server too."""

from __future__ import annotations

# Read a job entry and its seal, counting the outcome; on a miss, try to take the lease.
# The lease is re-entrant for its token: a reader whose first try died half-way (a foreign
# value at the stats key, dropped since) takes it again instead of waiting it out.
# KEYS: entry, lease, stats, seal   ARGV: lease token, lease ms
# Returns {0, value, seal} hit · {1} miss, lease granted (go fill) · {2} miss, another fills.
READ_JOB = """
local v = redis.call('GET', KEYS[1])
if v then
  redis.call('HINCRBY', KEYS[3], 'hits', 1)
  return {0, v, redis.call('GET', KEYS[4])}
end
if redis.call('GET', KEYS[2]) == ARGV[1]
    or redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('HINCRBY', KEYS[3], 'misses', 1)
  return {1}
end
return {2}
"""

# Versioned compare-and-set: store the value only if it is newer than the cached one.
# With a lease token, also require that the lease is still ours (an invalidation or a
# newer write since our DB read revoked it), and release it.
# The value's seal is stored beside it, with the same TTL.
# KEYS: entry, lease, seal
# ARGV: version, value, ttl seconds, lease token ('' = writer, no lease), seal
# Returns 1 stored · 0 refused (older or equal version, or lease lost).
SET_IF_NEWER = """
if ARGV[4] ~= '' then
  if redis.call('GET', KEYS[2]) ~= ARGV[4] then return 0 end
  redis.call('DEL', KEYS[2])
end
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, doc = pcall(cjson.decode, cur)
  if ok and type(doc) == 'table' then
    local cv = tonumber(doc['version'])
    if cv and cv >= tonumber(ARGV[1]) then return 0 end
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[3])
return 1
"""

# Release a lease only if it is still ours (the job did not exist: nothing to fill).
# KEYS: lease   ARGV: token
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Read one page of a client's job list. The hash carries an epoch; invalidation is a
# DEL of the hash, so a filler that read the epoch before it cannot write after it.
# A page's seal is the field '_seal:<page>' of the same hash.
# KEYS: list hash, stats   ARGV: page field, fresh epoch token, ttl seconds
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
  redis.call('HINCRBY', KEYS[2], 'hits', 1)
  return {epoch, r[1], r[3]}
end
redis.call('HINCRBY', KEYS[2], 'misses', 1)
return {epoch}
"""

# Fill one page if the list was not invalidated since the epoch was read.
# KEYS: list hash   ARGV: epoch, page field, value, seal
FILL_LIST = """
if redis.call('HGET', KEYS[1], '_epoch') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3], '_seal:' .. ARGV[2], ARGV[4])
return 1
"""

ALL = {
    "read_job": READ_JOB,
    "set_if_newer": SET_IF_NEWER,
    "release_lease": RELEASE_LEASE,
    "read_list": READ_LIST,
    "fill_list": FILL_LIST,
}
