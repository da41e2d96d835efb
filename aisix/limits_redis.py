"""RedisStore: rate limit counts shared by every instance through one Redis (not Cluster).

The ``limits.Store`` behind a ``redis://`` backend; ``Limiter`` (limits.py) decides what a
failure means. One Lua script per admission reads every counter of the request (key and model
scopes; request windows, token windows, concurrency) and increments only when all pass, so two
instances can never both admit the last request of a window. Counters are
``aisix:rl:{scope}:{name}:{window}:{window_start}``, expiring ``_MARGIN`` seconds after their
window (the margin absorbs clock skew between instances). Concurrency is a ZSET
``aisix:rl:{scope}:{name}:concurrency`` of slot ids scored by ``admission + _LEASE``: settle
removes the id, and every admission first drops expired ids. A process that dies holding slots
therefore leaks them for at most the lease, never forever; a plain counter would leak for good.
The lease (1 h) outlasts ordinary answers (``upstream.timeout_ms`` defaults to 10 min); one
still streaming after it loses its slot early, which can only admit too much, never block. No
refresh: it would cost a Redis call per long answer for that rare case.

Target cooldowns (routing.py) are shared the same way: a target's recent failures are a ZSET
``aisix:cd:{alias}|{target}:failures`` scored by time, and a cooldown is a string
``aisix:cd:{alias}|{target}:until`` holding when it ends; one script records a failure and starts
the cooldown atomically, one MGET reads every target of an alias.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .config import Cooldown
from .limits import Immediate
from .limits_plan import Limit, Plan, is_over, window_start

_MARGIN = 60  # seconds a window counter outlives its window in Redis
_LEASE = 3600  # seconds a Redis concurrency slot outlives a process that never released it
# Connections to Redis per process. A burst of requests waits for one (a command takes well under
# a millisecond) instead of opening a connection per request in flight: hundreds of connects at
# once, each with its connect timeout, failed open under load, and every instance multiplied them.
CONNECTIONS = 64
POOL_WAIT_S = 2.0  # for a free connection (RedisStore says why these three are what they are)
CONNECT_S = 2.0  # to open one
STEP_S = 1.0  # for each read or write of a command


# KEYS: one counter per limit. ARGV: now, slot id, its lease end, then per key its kind, limit
# and ttl. Kinds: r (request window: refuses at the limit, counts the request), t, u, s (token,
# cost and audio-second windows: refuse over the limit, counted by settle), c (concurrency ZSET).
# The rule of limits.is_over() is repeated here; the store tests hold the two to the same answers.
# Returns {blocked indexes, every count}.
_ADMIT = """
local blocked, counts = {}, {}
for i, key in ipairs(KEYS) do
  local kind, limit, count = ARGV[3 * i + 1], tonumber(ARGV[3 * i + 2])
  if kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[1])
    count = redis.call('ZCARD', key)
  else
    count = tonumber(redis.call('GET', key) or '0')
  end
  counts[i] = count
  if count > limit or (count == limit and (kind == 'r' or kind == 'c')) then blocked[#blocked + 1] = i end
end
if #blocked > 0 then return {blocked, counts} end
for i, key in ipairs(KEYS) do
  local kind, ttl = ARGV[3 * i + 1], ARGV[3 * i + 3]
  if kind == 'r' then
    redis.call('INCR', key)
    redis.call('EXPIRE', key, ttl)
  elseif kind == 'c' then
    redis.call('ZADD', key, ARGV[3], ARGV[2])
    redis.call('EXPIRE', key, ttl)
  end
end
return {blocked, counts}
"""


# KEYS: the failures ZSET, the cooldown key. ARGV: now, window_s, failures, cooldown_s, a member.
_FAILED = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]) + _MARGIN)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], tostring(now + tonumber(ARGV[4])), 'EX', tonumber(ARGV[4]) + _MARGIN)
return 1
""".replace("_MARGIN", str(_MARGIN))


class RedisStore:
    """Counts shared by every instance through one Redis (not Cluster: a script's keys span
    scopes). At most ``CONNECTIONS`` connections and no retries. A dead Redis stalls the requests
    already waiting on it by at most ``STEP_S`` per read or write, or ``CONNECT_S`` for a
    connect; then Limiter admits unchecked, trying the store again with one request at a time.
    The connect is given longer because a burst on a fresh pool opens many at once, and on a
    busy machine each one's handshake waits behind all the others' (64 at once outlasted 0.5 s
    on a loaded 2-core CI runner): failing open then would let a burst past the limits just when
    they matter. Likewise a free connection is waited for ``POOL_WAIT_S``: each one in use is
    freed within those steps, so only a pool kept busy by a live Redis under load waits long."""

    errors: tuple[type[Exception], ...] = (RedisError, OSError)  # OSError covers asyncio's TimeoutError
    immediate: Immediate | None = None  # every call is a round trip

    def __init__(self, url: str) -> None:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=CONNECTIONS, timeout=POOL_WAIT_S, socket_connect_timeout=CONNECT_S,
            socket_timeout=STEP_S, retry=Retry(NoBackoff(), 0))
        self._redis = redis.asyncio.Redis(connection_pool=pool)
        self._admit = self._redis.register_script(_ADMIT)
        self._failed = self._redis.register_script(_FAILED)

    async def admit(self, plan: Plan, slot_id: str, now: float) -> tuple[list[Limit], list[int]]:
        keys: list[str] = []
        args: list[str | int] = [repr(now), slot_id, repr(now + _LEASE)]
        for x in plan.limits:
            if x.size:
                keys.append(f"{x.key}:{window_start(now, x.size)}")
                args += [x.unit[0], x.limit, x.size + _MARGIN]
            else:
                keys.append(x.key)
                args += ["c", x.limit, _LEASE]
        blocked, counts = await self._admit(keys, args)
        return [plan.limits[i - 1] for i in blocked], [int(n) for n in counts]

    async def settle(self, plan: Plan, slot_id: str, charges: dict[str, int], now: float) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for x in plan.concurrency:
                pipe.zrem(x.key, slot_id)
            for x in plan.charged:
                amount = charges.get(x.unit)
                if not amount:
                    continue
                key = f"{x.key}:{window_start(now, x.size)}"
                pipe.incrby(key, amount)
                pipe.expire(key, x.size + _MARGIN)
            await pipe.execute()

    async def charge(self, plan: Plan, charges: dict[str, int], now: float) -> list[Limit]:
        charged = [x for x in plan.charged if charges.get(x.unit)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for x in charged:
                key = f"{x.key}:{window_start(now, x.size)}"
                pipe.incrby(key, charges[x.unit])
                pipe.expire(key, x.size + _MARGIN)
            counts = (await pipe.execute())[::2]
        return [x for x, count in zip(charged, counts, strict=True) if is_over(x, int(count))]

    async def cooling(self, keys: Sequence[str], now: float) -> dict[int, float]:
        ends = await self._redis.mget([f"aisix:cd:{k}:until" for k in keys])
        return {i: float(end) for i, end in enumerate(ends) if end is not None and float(end) > now}

    async def failed(self, key: str, policy: Cooldown, now: float) -> bool:
        member = f"{now!r}:{secrets.token_hex(4)}"  # two failures in the same instant both count
        started = await self._failed([f"aisix:cd:{key}:failures", f"aisix:cd:{key}:until"],
                                     [repr(now), policy.window_s, policy.failures, policy.cooldown_s, member])
        return bool(started)

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)
