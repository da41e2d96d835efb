"""What a request's rate limits are and what a refusal says: the window math, the plan of the
limits a request touches (an api key's, a model's, a provider key's), and the 429 it becomes.

[core] Pure: every function takes ``now`` (Unix seconds) and none does I/O. The stores that keep
the counts (limits_memory.py, limits_redis.py) and the ``Limiter`` that joins them for the
pipeline (limits.py) build on it. Windows are fixed and aligned to the clock (UTC calendar days
and months for ``*_per_day``/``*_per_month``); amounts are kept as integers (micro-USD,
milliseconds of audio).
"""

from __future__ import annotations

import calendar
import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import errors
from .config import RateLimit

MONTH = 31 * 86400  # the size of a UTC calendar month's window (its TTL); its bounds are the calendar's
_WINDOWS = (  # (field, seconds, unit); this order breaks ties between windows that end together
    ("rps", 1, "requests"), ("rpm", 60, "requests"), ("rph", 3600, "requests"),
    ("rpd", 86400, "requests"), ("tpm", 60, "tokens"), ("tpd", 86400, "tokens"),
    ("cost_usd_per_day", 86400, "usd"), ("cost_usd_per_month", MONTH, "usd"),
    ("audio_seconds_per_hour", 3600, "seconds"), ("audio_seconds_per_day", 86400, "seconds"),
)
# Amounts are kept as integers in every store: micro-USD and milliseconds of audio.
SCALE = {"requests": 1, "tokens": 1, "concurrency": 1, "usd": 1_000_000, "seconds": 1000}
CHARGED = ("tokens", "usd", "seconds")  # known only once the answer is relayed: charged by settle
_PERIOD = {1: "second", 60: "minute", 3600: "hour", 86400: "day", MONTH: "month"}


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit of one scope: a window (``size`` seconds) or concurrency (``size`` 0)."""

    scope: str  # "key" | "model" | "provider"
    name: str  # the api key's name, the model's alias or the provider key's name
    field: str  # "rpm", "tpd", "concurrency", ...
    size: int
    limit: int
    unit: str  # "requests" | "tokens" | "concurrency" | "usd" | "seconds"; counts scaled by SCALE
    key: str  # aisix:rl:{scope}:{name}:{field}; a window's counter adds ":{window_start}"


@dataclass(frozen=True, slots=True)
class Plan:
    """Every limit one (api key, model) pair is held to, built once per pair."""

    limits: tuple[Limit, ...]  # what admit checks, key scope first
    charged: tuple[Limit, ...]  # the windows settle charges (tokens, cost, audio seconds)
    concurrency: tuple[Limit, ...]  # the slots admit takes and settle gives back


def window_start(now: float, size: int) -> int:
    if size == MONTH:
        t = time.gmtime(now)
        return calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    return int(now // size) * size


def window_end(now: float, size: int) -> int:
    if size == MONTH:
        t = time.gmtime(now)
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        return calendar.timegm((year, month, 1, 0, 0, 0))
    return window_start(now, size) + size


def reset_after(now: float, size: int) -> int:
    """Whole seconds from now to the end of the window, rounded up, at least 1."""
    return max(1, math.ceil(window_end(now, size) - now))


def is_over(limit: Limit, count: int) -> bool:
    """Whether a count refuses the next request: what is charged after the answer (tokens, cost,
    audio seconds) once over the limit, requests and slots once at it."""
    return count > limit.limit if limit.unit in CHARGED else count >= limit.limit


def _scope_limits(scope: str, name: str, rate: RateLimit | None) -> tuple[Limit, ...]:
    if rate is None:
        return ()
    prefix = f"aisix:rl:{scope}:{name}:"
    out = [Limit(scope, name, f, size, round(getattr(rate, f) * SCALE[unit]), unit, prefix + f)
           for f, size, unit in _WINDOWS if getattr(rate, f) is not None]
    if rate.concurrency is not None:
        out.append(Limit(scope, name, "concurrency", 0, rate.concurrency, "concurrency",
                         prefix + "concurrency"))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def plan(key_name: str, key_rate: RateLimit | None, alias: str, model_rate: RateLimit | None) -> Plan:
    return _plan(_scope_limits("key", key_name, key_rate) + _scope_limits("model", alias, model_rate))


def _plan(limits: tuple[Limit, ...]) -> Plan:
    return Plan(limits, tuple(x for x in limits if x.unit in CHARGED),
                tuple(x for x in limits if x.unit == "concurrency"))


@functools.lru_cache(maxsize=1024)
def provider_plan(name: str, rate: RateLimit) -> Plan:
    return _plan(_scope_limits("provider", name, rate))


def needing(p: Plan, seconds: float, claimed: Mapping[str, float]) -> Plan:
    """``p`` with each audio quota lowered by ``seconds`` and what is ``claimed`` from it (by
    Limit.key): a store that admits it has room for them under the quota as configured. Its
    limits are in p's order."""
    if not any(x.unit == "seconds" for x in p.limits):
        return p
    scale = SCALE["seconds"]
    return Plan(tuple(dataclasses.replace(x, limit=x.limit - math.ceil((seconds + claimed.get(x.key, 0.0)) * scale))
                      if x.unit == "seconds" else x for x in p.limits), p.charged, p.concurrency)


def rejection(blocked: Sequence[Limit], now: float) -> errors.RateLimited:
    """The 429 for a refused request. A window beats concurrency (its wait is known); among
    windows, the one that resets last, since waiting for any earlier one would not be enough."""
    windows = [x for x in blocked if x.size]
    if not windows:
        c = blocked[0]
        return errors.concurrency_exceeded(c.scope, _who(c), c.limit)
    w = max(windows, key=lambda x: window_end(now, x.size))  # ties: the first
    reset = reset_after(now, w.size)
    if w.unit == "usd":
        return errors.budget_exceeded(w.scope, _who(w), w.limit / SCALE["usd"], _PERIOD[w.size], reset)
    if w.unit == "seconds":
        return errors.audio_quota_exceeded(w.scope, _who(w), w.limit // SCALE["seconds"], _PERIOD[w.size], reset)
    return errors.window_exceeded(w.scope, _who(w), w.limit, w.unit, _PERIOD[w.size], reset)


def upload_rejection(quota: Limit, now: float, seconds: float, left: float, at_least: bool) -> errors.RateLimited:
    """The 429 for an upload longer than what an audio quota has ``left``: the quota is not spent
    (a shorter upload would be taken), so the message says what is left rather than "exceeded"."""
    return errors.audio_quota_too_short(quota.scope, _who(quota), quota.limit // SCALE["seconds"],
                                        _PERIOD[quota.size], reset_after(now, quota.size), seconds, left, at_least)


def _who(limit: Limit) -> str:
    if limit.scope == "provider":  # the provider key's name is the operator's business
        return "the upstream provider of this model"
    return "this API key" if limit.scope == "key" else f"model '{limit.name}'"
