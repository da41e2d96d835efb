"""The rate limits' store for one process (limits.py says what is counted and how a refusal reads).

Dicts: a window counter is keyed by scope, name and window kind and holds only the current window
(a new window replaces the old one), so memory is bounded by the configured names, whatever the
traffic. It never suspends, so each admission is atomic under asyncio, and it never fails: the
Limiter calls its synchronous ``admit_now`` and ``settle_now`` (``Store.immediate``) rather than
a coroutine per request. The target cooldowns of routing.py are kept here too.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import routing
from .config import Cooldown
from .limits import Immediate
from .limits_plan import CHARGED, Limit, Plan, is_over, window_start


class MemoryStore:
    """Counts for one process. Never suspends, so each admission is atomic under asyncio."""

    errors: tuple[type[Exception], ...] = ()  # dicts do not fail

    def __init__(self) -> None:
        self.immediate: Immediate | None = self  # the Limiter calls admit_now and settle_now directly
        self._windows: dict[str, list[int]] = {}  # Limit.key -> [window_start, count]
        self._in_flight: dict[str, int] = {}  # Limit.key -> slots held
        self._cooldowns = routing.Cooldowns()

    def _count(self, limit: Limit, now: float) -> int:
        if not limit.size:
            return self._in_flight.get(limit.key, 0)
        entry = self._windows.get(limit.key)
        return entry[1] if entry and entry[0] == window_start(now, limit.size) else 0

    def _add(self, limit: Limit, n: int, now: float) -> None:
        start = window_start(now, limit.size)
        entry = self._windows.get(limit.key)
        if entry and entry[0] == start:
            entry[1] += n
        else:  # a new window: the old counter is dropped here
            self._windows[limit.key] = [start, n]

    async def admit(self, plan: Plan, slot_id: str, now: float) -> tuple[list[Limit], list[int]]:
        return self.admit_now(plan, now)

    async def settle(self, plan: Plan, slot_id: str, charges: dict[str, int], now: float) -> None:
        self.settle_now(plan, charges, now)

    # The Limiter calls these two directly: no coroutine per call on every request.

    def admit_now(self, plan: Plan, now: float) -> tuple[list[Limit], list[int]]:
        # One pass that counts and checks (this runs on every request), then one that takes.
        windows, in_flight = self._windows, self._in_flight
        counts: list[int] = []
        starts: list[int] = []
        blocked: list[Limit] = []
        for x in plan.limits:
            if x.size:
                start = window_start(now, x.size)
                entry = windows.get(x.key)
                n = entry[1] if entry is not None and entry[0] == start else 0
            else:
                start, n = 0, in_flight.get(x.key, 0)
            counts.append(n)
            starts.append(start)
            if (n > x.limit) if x.unit in CHARGED else (n >= x.limit):  # is_over, inline
                blocked.append(x)
        if not blocked:
            for x, n, start in zip(plan.limits, counts, starts, strict=True):
                if x.unit == "requests":
                    if n:  # the entry of this window
                        windows[x.key][1] = n + 1
                    else:  # a new window: the old counter is dropped here
                        windows[x.key] = [start, 1]
                elif x.unit == "concurrency":
                    in_flight[x.key] = n + 1
        return blocked, counts

    def settle_now(self, plan: Plan, charges: dict[str, int], now: float) -> None:
        for x in plan.concurrency:
            held = self._in_flight.get(x.key, 0) - 1
            if held > 0:
                self._in_flight[x.key] = held
            else:
                self._in_flight.pop(x.key, None)
        for x in plan.charged:
            amount = charges.get(x.unit)
            if amount:
                self._add(x, amount, now)

    async def charge(self, plan: Plan, charges: dict[str, int], now: float) -> list[Limit]:
        charged = [x for x in plan.charged if charges.get(x.unit)]
        for x in charged:
            self._add(x, charges[x.unit], now)
        return [x for x in charged if is_over(x, self._count(x, now))]

    async def cooling(self, keys: Sequence[str], now: float) -> dict[int, float]:
        return self._cooldowns.cooling(keys, now)

    async def failed(self, key: str, policy: Cooldown, now: float) -> bool:
        return self._cooldowns.failed(key, policy, now)

    async def close(self) -> None:
        pass
