"""Request rate limit per API key: GCRA (the generic cell rate algorithm), in Redis or in-process.

GCRA keeps one number per key, the *theoretical arrival time* (TAT): when the key's budget would be
back to full if requests arrived exactly at the allowed rate. A request at ``now`` is allowed when
``TAT + interval - period <= now``, which lets a key spend its whole per-minute budget in one burst and
then refills it smoothly (one request every ``period / limit``) — no cliff at window boundaries as
with fixed windows, and only one key to store. The rejection carries the exact wait (Retry-After).

Where: Redis when the broker is ``redis://`` (shared by every API process; an atomic Lua script using
the Redis clock, so API hosts need no synchronised clocks); a dictionary in this process in the
embedded mode (one API process, no server). Both are asyncio: the check runs on the API's event loop, and
each app makes its own limiter in its lifespan (an asyncio Redis connection belongs to one event loop).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from app.config import Settings

log = logging.getLogger("modelpress.ratelimit")
PERIOD_MS = 60_000


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    retry_after_s: int  # 0 when allowed


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: int) -> Decision: ...

    async def aclose(self) -> None: ...


def _gcra(tat: float, now: float, limit: int) -> tuple[bool, float, int, float]:
    """One GCRA step: (allowed, new TAT, remaining, wait in ms). Times in milliseconds."""
    interval = PERIOD_MS / limit
    tat = max(tat, now)
    new_tat = tat + interval
    allow_at = new_tat - PERIOD_MS
    if now < allow_at:
        return False, tat, 0, allow_at - now
    return True, new_tat, int((now - allow_at) // interval), 0.0


class MemoryRateLimiter:
    """In-process GCRA (embedded mode: a single API process). Used only from its app's event loop, so a
    hit runs whole, with no other hit in between: no lock."""

    def __init__(self, clock: Any = None) -> None:
        self._clock = clock or (lambda: time.monotonic() * 1000)
        self._tat: dict[str, float] = {}

    async def hit(self, key: str, limit: int) -> Decision:
        now = float(self._clock())
        if len(self._tat) > 10_000:  # forget keys whose budget is full again (bounded memory)
            self._tat = {k: v for k, v in self._tat.items() if v > now}
        allowed, tat, remaining, wait_ms = _gcra(self._tat.get(key, now), now, limit)
        self._tat[key] = tat
        return Decision(allowed, limit, remaining, math.ceil(wait_ms / 1000))

    async def aclose(self) -> None:
        pass


# KEYS[1] = the key's TAT; ARGV = period ms, limit. Returns {allowed, remaining, wait ms}.
_LUA = """
local period = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = period / limit
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - period
if now < allow_at then
  return {0, 0, math.ceil(allow_at - now)}
end
new_tat = math.ceil(new_tat)
redis.call('SET', KEYS[1], new_tat, 'PX', math.max(1, new_tat - now))
return {1, math.floor((now - allow_at) / interval), 0}
"""


class RedisRateLimiter:
    """GCRA in Redis: one key per API key, expiring when its budget is full again."""

    def __init__(self, url: str) -> None:
        import redis.asyncio

        self._redis = redis.asyncio.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        self._script = self._redis.register_script(_LUA)

    async def hit(self, key: str, limit: int) -> Decision:
        keys = [f"modelpress:ratelimit:{key}"]
        allowed, remaining, wait_ms = await self._script(keys=keys, args=[PERIOD_MS, limit])
        return Decision(bool(allowed), limit, int(remaining), math.ceil(int(wait_ms) / 1000))

    async def aclose(self) -> None:
        await self._redis.aclose()


def create_rate_limiter(settings: Settings) -> RateLimiter:
    """Redis when the broker is Redis (shared by every API process), else in this process (embedded)."""
    broker_url = settings.resolved_broker_url()
    if broker_url.startswith(("redis://", "rediss://")):
        return RedisRateLimiter(broker_url)
    return MemoryRateLimiter()


async def check_rate(limiter: RateLimiter, settings: Settings, key_id: str, limit: int | None) -> Decision:
    """Count one request of ``key_id``. A Redis outage lets requests through (logged): the limiter protects
    the service, it must not be the thing that takes it down."""
    effective = limit or settings.quota_requests_per_minute
    try:
        return await limiter.hit(key_id, effective)
    except Exception:
        log.warning("rate limiter unavailable; allowing the request", exc_info=True)
        return Decision(True, effective, effective, 0)
