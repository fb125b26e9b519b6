"""Lua scripts of the cluster state (key layout: router/state/keys.py).

Each runs atomically in Redis, so several routers and workers never interleave inside one.
"""

NAMES = (
    "ADD_INFLIGHT", "RESERVE", "RECORD_PREFIX", "BLOCK_EVENTS", "REGISTER", "DEREGISTER",
    "DROP_ALIVE",
)  # fmt: skip

ADD_INFLIGHT = """
local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') + tonumber(ARGV[2])
if v < 0 then v = 0 end
redis.call('HSET', KEYS[1], ARGV[1], v)
return v
"""

RESERVE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if v ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], v + 1)
return 1
"""

RECORD_PREFIX = """
local seq = redis.call('INCRBY', KEYS[2], #ARGV - 1)
local cap = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], seq - #ARGV + i, ARGV[i]) end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(cap + 1))
return 1
"""

BLOCK_EVENTS = """
if ARGV[3] == '1' then redis.call('DEL', KEYS[1]) end
local seq = redis.call('INCRBY', KEYS[2], #ARGV)
local cap, n = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 4, 3 + n do redis.call('ZADD', KEYS[1], seq - #ARGV + i, ARGV[i]) end
for i = 4 + n, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(cap + 1))
return 1
"""
"""ARGV: block count, number stored, reset ('1': replace the whole index), stored...,
evicted..."""

REGISTER = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
local cluster = redis.call('GET', KEYS[1])
if cluster ~= ARGV[1] then return cluster end
local old = redis.call('HGET', KEYS[3], ARGV[2])
if old and old ~= ARGV[4] then
  redis.call('DEL', ARGV[6] .. old)
  redis.call('HSET', KEYS[5], ARGV[2], 0)
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[4])
redis.call('HSET', KEYS[6], ARGV[2], ARGV[7])
redis.call('HDEL', KEYS[7], ARGV[2])
redis.call('SET', KEYS[4], ARGV[4], 'PX', ARGV[5])
return false
"""
"""Layout check and registration in one step. KEYS: layout, workers, epochs, alive:<id>,
inflight, load, refused. ARGV: layout JSON, worker id, record JSON, epoch, TTL ms,
prefix-key stem (``<p>:prefix:<id>:``), load JSON. Returns nil, or the cluster's layout
JSON when the worker's differs (nothing written)."""

DEREGISTER = """
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
for _, k in ipairs({KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]}) do
  redis.call('HDEL', k, ARGV[1])
end
redis.call('DEL', KEYS[6], KEYS[7])
return 1
"""
"""Remove one incarnation (a newer one that registered meanwhile stays). KEYS: workers,
load, epochs, inflight, refused, alive:<id>, prefix:<id>:<epoch>. ARGV: id, epoch."""

DROP_ALIVE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
"""Mark one incarnation down until its next heartbeat: delete ``alive:<id>`` only while it
still holds that epoch. KEYS: alive:<id>. ARGV: epoch."""
