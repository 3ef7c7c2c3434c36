"""The Redis state store: rate limits and budgets shared by every worker and replica.

Each operation is one Lua script, so it is atomic under any concurrency, and each reads the
Redis server's clock (`TIME`), so the gateways' clocks never matter. redis-py's registered
scripts run by EVALSHA and re-send their source when Redis answers NOSCRIPT (after a restart
or SCRIPT FLUSH). Any failure or a call past `deadline_s` raises `StateUnavailable`.

Keys under `prefix` (the `{…}` hash tag keeps a budget's keys in one cluster slot):
- `rate:{key}`: the GCRA TAT (epoch seconds), expiring when it falls behind the clock;
- `budget:{name}`: hash {spent, reserved, end} in micro-dollars and epoch ms;
- `budget:{name}:res`: sorted set of live holds scored by expiry (ms), pruned in every script;
- `budget:{name}:amt`: hash hold id -> amount; `budget:{name}:done`: settled ids (ZSET, by
  when they are forgotten). All four expire at the period's end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gateway.state import (
    HOLD_RETRY_S,
    SETTLED_MEMORY_S,
    BudgetDecision,
    RateDecision,
    StateUnavailable,
    check_budget_args,
    to_micros,
    to_usd,
)
from router.limits import TOLERANCE_S, check_rate

DEADLINE_S = 0.5  # per call, on top of the client's socket timeouts (and any retries it makes)

_NUM = "local function num(x) return string.format('%.17g', x) end\n"
_NOW_S = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"
_NOW_MS = (
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
)

# KEYS: tat. ARGV: cost, limit, window_s, tolerance_s. Mirrors router.limits.gcra.
TAKE = (
    _NUM
    + _NOW_S
    + """
local cost, limit, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local interval = window / limit
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local function units(at) return math.max(0, (window - (at - now)) / interval) end
if cost > limit then return {0, 'inf', num(units(tat)), 1} end
local new_tat = tat + cost * interval
local ahead = new_tat - now
if ahead > window + tonumber(ARGV[4]) then
  return {0, num(ahead - window), num(units(tat)), 0}
end
if ahead > 0 then
  redis.call('SET', KEYS[1], num(new_tat), 'PX', math.max(1, math.ceil(ahead * 1000)))
end
return {1, '0', num(units(new_tat)), 0}
"""
)

# KEYS: tat. ARGV: cost, limit, window_s. Mirrors router.limits.gcra_give_back.
GIVE_BACK = (
    _NUM
    + _NOW_S
    + """
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then return 0 end
local back = tat - tonumber(ARGV[1]) * tonumber(ARGV[3]) / tonumber(ARGV[2])
if back > now then
  redis.call('SET', KEYS[1], num(back), 'PX', math.max(1, math.ceil((back - now) * 1000)))
else
  redis.call('DEL', KEYS[1])
end
return 1
"""
)

# KEYS of every budget script: main hash, holds zset, amounts hash, settled zset.
_PRUNE = """
local function prune()
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
  if #gone == 0 then return end
  local freed = 0
  for _, id in ipairs(gone) do
    freed = freed + (tonumber(redis.call('HGET', KEYS[3], id)) or 0)
    redis.call('HDEL', KEYS[3], id)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if freed > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('HINCRBY', KEYS[1], 'reserved', string.format('%d', -freed))
  end
end
prune()
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local function field(name) return tonumber(redis.call('HGET', KEYS[1], name)) or 0 end
"""

# ARGV: id, amount, limit, period_end_ms, ttl_ms, hold_retry_ms. Returns
# {allowed, spent, reserved, retry_after_ms}.
RESERVE = (
    _NOW_MS
    + _PRUNE
    + """
local id, amount, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl = tonumber(ARGV[5])
local ends = tonumber(redis.call('HGET', KEYS[1], 'end'))
if not ends then
  ends = tonumber(ARGV[4])
  if ends <= now then ends = now + ttl end
  redis.call('HSET', KEYS[1], 'end', string.format('%d', ends), 'spent', '0', 'reserved', '0')
  redis.call('PEXPIREAT', KEYS[1], ends)
end
local spent, reserved = field('spent'), field('reserved')
if redis.call('HEXISTS', KEYS[3], id) == 1 then return {1, spent, reserved, 0} end
if spent + amount > limit then return {0, spent, reserved, math.max(ends - now, 0)} end
if spent + reserved + amount > limit then
  local wait = tonumber(ARGV[6])
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if first[2] then wait = math.min(math.max(tonumber(first[2]) - now, 0), wait) end
  return {0, spent, reserved, wait}
end
redis.call('ZADD', KEYS[2], now + ttl, id)
redis.call('HSET', KEYS[3], id, ARGV[2])
redis.call('HINCRBY', KEYS[1], 'reserved', ARGV[2])
redis.call('PEXPIREAT', KEYS[2], ends)
redis.call('PEXPIREAT', KEYS[3], ends)
return {1, spent, reserved + amount, 0}
"""
)

# ARGV: id, actual, settled_memory_ms. Returns 0 (period over), 1 (repeat), 2 (settled).
SETTLE = (
    _NOW_MS
    + _PRUNE
    + """
local ends = tonumber(redis.call('HGET', KEYS[1], 'end'))
if not ends then return 0 end
local id = ARGV[1]
if redis.call('ZSCORE', KEYS[4], id) then return 1 end
local forget = now + tonumber(ARGV[3])
local amount = tonumber(redis.call('HGET', KEYS[3], id))
if amount then
  local expiry = tonumber(redis.call('ZSCORE', KEYS[2], id)) or 0
  if expiry > forget then forget = expiry end
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[2], id)
  if amount > 0 then
    redis.call('HINCRBY', KEYS[1], 'reserved', string.format('%d', -amount))
  end
end
redis.call('HINCRBY', KEYS[1], 'spent', ARGV[2])
redis.call('ZADD', KEYS[4], forget, id)
redis.call('PEXPIREAT', KEYS[4], ends)
return 2
"""
)

# Returns {spent, reserved}.
TOTALS = _NOW_MS + _PRUNE + "return {field('spent'), field('reserved')}\n"


class RedisState:
    """Rate limits and budgets in Redis (see gateway/state.py for the contract). The client is
    the caller's (made by `connect_redis`); `aclose` leaves it open."""

    def __init__(self, client: Redis, prefix: str = "turnout:", deadline_s: float = DEADLINE_S):
        self._prefix = prefix
        self._deadline_s = deadline_s
        self._take = client.register_script(TAKE)
        self._give_back = client.register_script(GIVE_BACK)
        self._reserve = client.register_script(RESERVE)
        self._settle = client.register_script(SETTLE)
        self._totals = client.register_script(TOTALS)

    async def take(self, key: str, cost: float, limit: float, window_s: float) -> RateDecision:
        check_rate(cost, limit, window_s)
        args = [repr(float(cost)), repr(float(limit)), repr(float(window_s)), repr(TOLERANCE_S)]
        allowed, retry, remaining, too_large = await self._run(
            self._take, [self._rate_key(key)], args
        )
        return RateDecision(bool(allowed), float(retry), float(remaining), bool(too_large))

    async def give_back(self, key: str, cost: float, limit: float, window_s: float) -> None:
        check_rate(cost, limit, window_s)
        args = [repr(float(cost)), repr(float(limit)), repr(float(window_s))]
        await self._run(self._give_back, [self._rate_key(key)], args)

    async def reserve(
        self,
        budget: str,
        reservation: str,
        amount: float,
        limit: float,
        period_end: float,
        ttl_s: float,
    ) -> BudgetDecision:
        check_budget_args(ttl_s)
        args: list[str | int] = [
            reservation,
            to_micros(amount),
            to_micros(limit),
            round(period_end * 1000),
            max(1, round(ttl_s * 1000)),
            round(HOLD_RETRY_S * 1000),
        ]
        allowed, spent, reserved, retry_ms = await self._run(
            self._reserve, self._budget_keys(budget), args
        )
        return BudgetDecision(bool(allowed), to_usd(spent), to_usd(reserved), retry_ms / 1000)

    async def settle(self, budget: str, reservation: str, actual: float) -> None:
        """Off the request path: it may wait the longer DEADLINE_S (a lost settle leaves spend
        unrecorded until the hold expires)."""
        args: list[str | int] = [reservation, to_micros(actual), round(SETTLED_MEMORY_S * 1000)]
        keys = self._budget_keys(budget)
        await self._run(self._settle, keys, args, max(self._deadline_s, DEADLINE_S))

    async def totals(self, budget: str) -> tuple[float, float]:
        keys = self._budget_keys(budget)
        spent, reserved = await self._run(self._totals, keys, [], max(self._deadline_s, DEADLINE_S))
        return to_usd(spent), to_usd(reserved)

    async def aclose(self) -> None:
        pass

    async def _run(
        self,
        script: AsyncScript,
        keys: list[str],
        args: Sequence[str | int],
        deadline_s: float | None = None,
    ) -> Any:
        try:
            async with asyncio.timeout(deadline_s or self._deadline_s):
                return await script(keys=keys, args=args)
        except (RedisError, TimeoutError, OSError) as exc:
            raise StateUnavailable("The state store is unavailable.") from exc

    def _rate_key(self, key: str) -> str:
        return f"{self._prefix}rate:{{{key}}}"

    def _budget_keys(self, budget: str) -> list[str]:
        main = f"{self._prefix}budget:{{{budget}}}"
        return [main, f"{main}:res", f"{main}:amt", f"{main}:done"]
