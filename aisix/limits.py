"""Rate limits on api keys, models and provider keys, admit or refuse, then settle; and the target
cooldowns of routing.py, kept in the same store (one process, or Redis for every instance).

Not a quota or billing system: windows are fixed and aligned to the clock (docs/api.md, "Rate
limits"), and a limiter that cannot reach its store admits rather than refusing traffic (fails open).

What a request's limits are, their window math and the 429 a refusal becomes are limits_plan.py
[core]. Two stores keep the counts behind one small interface (``Store``, here), and ``Limiter``
joins them for the pipeline:

- ``MemoryStore`` (limits_memory.py): dicts for one process. A window counter is keyed by scope, name and window
  kind and holds only the current window (a new window replaces the old one), so memory is
  bounded by the configured names, whatever the traffic.
- ``RedisStore`` (limits_redis.py): shared by every instance; one atomic script per admission,
  concurrency slots as leases a dead process cannot hold forever. ``Limiter.create`` imports it
  only for a ``redis://`` backend, so this module does not need redis-py.

Scopes are named by the api key's ``name``, the model's ``alias`` and the provider key's ``name``,
never a key hash or secret. A provider key's limits are its provider's quota: they are admitted
per attempt (routing skips a target whose key is full) and settled with the answer's tokens.
Token windows are charged in the window current at ``settle`` (tokens are known only then).
A refusal raises ``errors.RateLimited``, whose ``scope`` ("key", "model" or "provider") labels
``aisix_rate_limited_total``. Store errors are counted in ``fail_open_total`` (admissions that
were not checked) and ``settle_errors_total`` (releases or token charges that were lost; a lost
release is sent again before the next admission the store answers, ``_released``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import secrets
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from . import errors
from .config import ApiKey, Cooldown, Model, ProviderKey
from .limits_plan import SCALE, Limit, Plan, needing, plan, provider_plan, rejection, upload_rejection
from .specs import BackendSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

# After a store error, seconds to admit unchecked before trying the store again; then one call
# tries it (Limiter._skip_store) while the others go on unchecked until that one is answered.
_PAUSE = 1.0
_UNRELEASED_MAX = 4096  # slots kept to give back after a store failure; past it, their lease ends them
_WARN_EVERY = 10.0  # seconds between two warnings about the store
GIVE_BACK_S = 2.0  # what close() waits for admissions and settles whose callers were cancelled


# -- stores --------------------------------------------------------------------------------------

class Immediate(Protocol):
    """A store's synchronous path, for one that never waits and never fails: the Limiter calls
    it on every request instead of the coroutines (no coroutine per call)."""

    def admit_now(self, plan: Plan, now: float) -> tuple[list[Limit], list[int]]: ...

    def settle_now(self, plan: Plan, charges: dict[str, int], now: float) -> None: ...


class Store(Protocol):
    errors: tuple[type[Exception], ...]  # what it raises when it cannot answer: admit fails open
    immediate: Immediate | None  # the same store's synchronous path, if it has one

    async def admit(self, plan: Plan, slot_id: str, now: float) -> tuple[list[Limit], list[int]]:
        """The limits that refuse the request (nothing counted), or [] once all is counted; and
        the count of every limit of the plan before this request."""

    async def settle(self, plan: Plan, slot_id: str, charges: dict[str, int], now: float) -> None:
        """Give back the request's slots and charge its amounts (unit -> scaled amount)."""

    async def charge(self, plan: Plan, charges: dict[str, int], now: float) -> list[Limit]:
        """Charge tokens to the plan's token windows, keeping its slots; the windows now over."""

    async def cooling(self, keys: Sequence[str], now: float) -> dict[int, float]:
        """Index in ``keys`` -> when its cooldown ends, for the targets cooling down."""

    async def failed(self, key: str, policy: Cooldown, now: float) -> bool:
        """Record a target's failure; True when it starts a cooldown."""

    async def close(self) -> None: ...


# -- the limiter ---------------------------------------------------------------------------------

@dataclass(slots=True, eq=False)
class Slot:
    """What one admitted request holds until ``settle``; ``plan`` None: nothing left to give back."""

    plan: Plan | None
    id: str  # its member in the Redis concurrency ZSETs; "" when it holds no slot
    # Each audio quota: (quota, seconds left when admitted, what this process had charged to it then).
    audio_quotas: tuple[tuple[Limit, float, float], ...] = ()
    audio_claim: float = 0.0  # seconds of its upload this request has claimed from them so far
    audio_seen: int = -1  # the Limiter's audio_version when its claim was last checked in full

    @property
    def audio_left(self) -> float | None:
        """Seconds its audio quotas had left when it was admitted (the least); None: no quota."""
        return min(left for _, left, _ in self.audio_quotas) if self.audio_quotas else None


class Limiter:
    """admit -> Slot | None (or raise RateLimited), then settle(slot) once the answer is relayed;
a realtime session also charges tokens as they are reported (charge)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._memory = store.immediate  # a store that never fails and never waits: called directly
        self._store_errors = store.errors
        self.fail_open_total = 0
        self.settle_errors_total = 0
        self._paused_until = 0.0  # 0: the store answered last; else when to try it again
        self._probing = False  # a call is trying the store again after a failure
        self._warned_at = -math.inf
        # Audio quotas in this process, by Limit.key: seconds claimed by uploads in flight (known
        # from their headers, or what has streamed), and seconds charged ever (settle, charge).
        # Uploads admitted together see the store's count as of their admission; these say what
        # the others took since, so that they cannot each spend the same remainder.
        self._audio_claims: dict[str, float] = {}
        self._audio_charged: dict[str, float] = {}
        self._audio_version = 0  # moves whenever either of them does
        self._running_on: set[asyncio.Future[Any]] = set()  # store calls a cancelled caller does not stop (_kept)
        # Concurrency slots the store may still hold though their requests are over: a release it
        # did not take, an admission whose answer was lost. Given back before the next admission
        # the store answers, rather than at the end of their lease (an hour in Redis), which would
        # shut a key with a small concurrency for that long after a blip.
        self._unreleased: dict[str, Plan] = {}
        self._releasing: asyncio.Future[None] | None = None

    @classmethod
    def create(cls, backend: BackendSpec) -> Limiter:
        if backend.kind == "redis":
            from .limits_redis import RedisStore  # here, so that a memory backend never imports redis-py

            return cls(RedisStore(backend.url))
        from .limits_memory import MemoryStore  # it builds on this module's plans and windows

        return cls(MemoryStore())

    async def admit(self, key: ApiKey, model: Model, now: float) -> Slot | None:
        """A slot to settle, or None when neither key nor model has limits; raises RateLimited."""
        if key.rate_limit is None and model.rate_limit is None:
            return None
        p = plan(key.name, key.rate_limit, model.alias, model.rate_limit)
        if self._memory is not None and p.limits:  # every request: no coroutine on the way
            return self._slot(p, Slot(p, secrets.token_hex(8) if p.concurrency else ""),
                              *self._memory.admit_now(p, now), now)
        return await self._admit(p, now)

    async def admit_key(self, key: ApiKey, now: float) -> Slot | None:
        """admit() on the key's limits alone: a realtime session that names its model later."""
        if key.rate_limit is None:
            return None
        return await self._admit(plan(key.name, key.rate_limit, "", None), now)

    async def admit_model(self, model: Model, now: float) -> Slot | None:
        """admit() on the model's limits alone, once such a session names it."""
        if model.rate_limit is None:
            return None
        return await self._admit(plan("", None, model.alias, model.rate_limit), now)

    async def _admit(self, p: Plan, now: float, audio_seconds: float = 0.0) -> Slot | None:
        if not p.limits:
            return None
        probe = self._paused_until != 0.0  # the store failed: do not wait on it, but for a probe
        if probe and self._skip_store(now):
            self.fail_open_total += 1
            return Slot(None, "")
        slot = Slot(p, secrets.token_hex(8) if p.concurrency else "")
        # What this process had charged to the audio quotas before the store's counts are read:
        # a charge that lands while they are read is then counted twice, never missed.
        before = {x.key: self._audio_charged.get(x.key, 0.0) for x in p.limits if x.unit == "seconds"}
        # A known audio length is admitted against what the audio quotas have left (less what
        # uploads in flight here claimed): refused so, the request counts nowhere, like any refusal.
        checked = needing(p, audio_seconds, self._audio_claims) if audio_seconds else p
        began = time.monotonic()
        sent = False  # whether the admission went to the store (not only the releases before it)
        try:
            if self._memory is not None:
                blocked, counts = self._memory.admit_now(checked, now)
            else:
                if self._unreleased:
                    await self._released(now)
                sent = True
                blocked, counts = await self._admitted(checked, slot.id, now)
                self._paused_until = 0.0
        except self._store_errors as e:
            self.fail_open_total += 1
            self._pause(now, began)
            self._warn(now, "rate limit store failed, admitting without checking limits: %s: %s", e)
            if sent:
                self._unrelease(p, slot.id)  # the script may have run and taken a slot
            return Slot(None, "")
        finally:
            if probe:
                self._probing = False
        if checked is not p:  # the refusal names the quotas as configured
            blocked = [p.limits[checked.limits.index(x)] for x in blocked]
        return self._slot(p, slot, blocked, counts, now, before)

    async def _admitted(self, p: Plan, slot_id: str, now: float) -> tuple[list[Limit], list[int]]:
        """The store's admission of a plan. When this task is cancelled during it (a caller
        leaving, a realtime session ending), the store's script may still run and take a
        concurrency slot nobody would give back before its lease (an hour in Redis): it runs on,
        and the slot it took is given back as soon as its answer comes."""
        if not p.concurrency:
            return await self._store.admit(p, slot_id, now)
        admitting = self._kept(self._store.admit(p, slot_id, now))
        try:
            return await asyncio.shield(admitting)
        except asyncio.CancelledError:
            admitting.add_done_callback(functools.partial(self._give_back, Slot(p, slot_id), now))
            raise

    def _kept(self, call: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """``call`` as a task of its own, which a cancelled caller does not stop (when it is
        awaited through asyncio.shield) and close() waits for."""
        task = asyncio.ensure_future(call)
        self._running_on.add(task)
        task.add_done_callback(self._running_on.discard)
        return task

    def _lost(self, now: float, what: str, e: Exception) -> None:
        """A release or charge the store did not take (counted; warned of now and then)."""
        self.settle_errors_total += 1
        self._warn(now, f"rate limit store failed to {what}: %s: %s", e)

    def _give_back(self, slot: Slot, now: float, admitting: asyncio.Future[tuple[list[Limit], list[int]]]) -> None:
        if admitting.cancelled() or admitting.exception() is not None:
            self._unrelease(slot.plan, slot.id)  # the script may have run
        elif not admitting.result()[0]:  # (refused: nothing taken)
            self._kept(self.settle(slot, None, now))

    def _unrelease(self, p: Plan | None, slot_id: str) -> None:
        """A slot the store may hold for a request that is over, to give back later (_released)."""
        if p is not None and p.concurrency and len(self._unreleased) < _UNRELEASED_MAX:
            self._unreleased[slot_id] = p

    def _released(self, now: float) -> asyncio.Future[None]:
        """The slots of ``_unreleased`` given back, by one task however many admissions wait for
        it; raises the store's error (the admission then fails open), keeping what is left."""
        task = self._releasing
        if task is None or task.done():
            task = self._releasing = self._kept(self._release(now))
            task.add_done_callback(_retrieved)
        return asyncio.shield(task)

    async def _release(self, now: float) -> None:
        while self._unreleased:
            slot_id, p = next(iter(self._unreleased.items()))
            await self._store.settle(p, slot_id, {}, now)  # a ZREM: harmless if the slot is gone
            self._unreleased.pop(slot_id, None)

    def _slot(self, p: Plan, slot: Slot, blocked: list[Limit], counts: list[int], now: float,
              before: dict[str, float] | None = None) -> Slot:
        """The admitted slot, with what its audio quotas have left; raises the refusal."""
        if blocked:
            raise rejection(blocked, now)
        quotas = []
        for x, n in zip(p.limits, counts, strict=True):
            if x.unit == "seconds":
                left = (x.limit - n) / SCALE["seconds"]
                quotas.append((x, left, (before or self._audio_charged).get(x.key, 0.0)))
        if quotas:
            slot.audio_quotas = tuple(quotas)
        return slot

    def audio_refusal(self, slot: Slot | None, seconds: float, now: float,
                      at_least: bool = False) -> errors.RateLimited | None:
        """The 429 for an upload of ``seconds`` that is more than its audio quotas have left:
        what they had when it was admitted, less what other uploads in this process have claimed
        or been charged since. Otherwise ``seconds`` is its claim (called again as it grows)."""
        if slot is None or not slot.audio_quotas:
            return None
        if seconds <= slot.audio_claim and slot.audio_seen == self._audio_version:
            return None  # within its claim, and nobody claimed or was charged since it was checked
        claims, charged, mine = self._audio_claims, self._audio_charged, slot.audio_claim
        for x, left, charged_then in slot.audio_quotas:
            taken = claims.get(x.key, 0.0) - mine + charged.get(x.key, 0.0) - charged_then
            if seconds > left - taken:
                return upload_rejection(x, now, seconds, left - taken, at_least)
        if seconds != mine:
            for x, _, _ in slot.audio_quotas:
                claims[x.key] = claims.get(x.key, 0.0) + seconds - mine
            slot.audio_claim = seconds
            self._audio_version += 1
        slot.audio_seen = self._audio_version
        return None

    def _audio_done(self, slot: Slot, p: Plan, audio_seconds: float | None) -> None:
        """The request's claim is given back, and what it is charged counted as charged here."""
        claims = self._audio_claims
        if slot.audio_claim or audio_seconds:
            self._audio_version += 1
        if slot.audio_claim:
            for x, _, _ in slot.audio_quotas:
                held = claims.get(x.key, 0.0) - slot.audio_claim
                if held > 1e-9:
                    claims[x.key] = held
                else:
                    claims.pop(x.key, None)
            slot.audio_claim = 0.0
        if audio_seconds:
            for x in p.charged:
                if x.unit == "seconds":
                    self._audio_charged[x.key] = self._audio_charged.get(x.key, 0.0) + audio_seconds

    async def admit_provider(self, key: ProviderKey, now: float, audio_seconds: float = 0.0) -> Slot | None:
        """A slot on the provider key's own limits (its quota), or None when it has none;
        raises RateLimited (scope "provider") when they refuse, and when ``audio_seconds`` (what
        is known of an upload's length) is more than its audio quotas have left."""
        if key.rate_limit is None:
            return None
        return await self._admit(provider_plan(key.name, key.rate_limit), now, audio_seconds)

    async def cooling(self, keys: Sequence[str], now: float) -> dict[int, float]:
        """The targets cooling down (index in ``keys`` -> end); none when the store fails."""
        probe = self._paused_until != 0.0
        if probe and self._skip_store(now):
            return {}
        began = time.monotonic()
        try:
            cooling = await self._store.cooling(keys, now)
            self._paused_until = 0.0
            return cooling
        except self._store_errors as e:
            self._pause(now, began)
            self._warn(now, "rate limit store failed, routing without cooldowns: %s: %s", e)
            return {}
        finally:
            if probe:
                self._probing = False

    def _pause(self, now: float, began: float) -> None:
        """The pause after a store failure, from the failure: ``now`` is when the call began
        (``began``, monotonic), and a store that timed out failed its timeouts later, as long as
        the pause or longer (RedisStore)."""
        self._paused_until = now + (time.monotonic() - began) + _PAUSE

    def _skip_store(self, now: float) -> bool:
        """After a store failure: True (do without it) for ``_PAUSE`` seconds, then for every call
        but one, the probe, which tries the store again (and must clear ``_probing`` when
        answered). A dead store so makes one request wait on it (for its timeouts: RedisStore)
        every ``_PAUSE`` or so, not every request in flight."""
        if 0.0 < self._paused_until - now <= _PAUSE or self._probing:  # (a clock gone back ends the pause)
            return True
        self._probing = True
        return False

    async def failed(self, key: str, policy: Cooldown, now: float) -> bool:
        """Record a target's failure; True when it starts a cooldown. Never raises; runs on when
        the caller is cancelled (a caller leaving as its attempt failed), as settle's does."""
        return await asyncio.shield(self._kept(self._failed(key, policy, now)))

    async def _failed(self, key: str, policy: Cooldown, now: float) -> bool:
        try:
            return await self._store.failed(key, policy, now)
        except self._store_errors as e:
            self._warn(now, "rate limit store failed to record a target failure: %s: %s", e)
            return False

    async def settle(self, slot: Slot | None, tokens: int | None, now: float, cost_usd: float | None = None,
                     audio_seconds: float | None = None) -> None:
        """Give back the slot's concurrency and charge its tokens, cost and audio seconds; once per
        slot, never raises."""
        if slot is None or slot.plan is None:
            return
        p, slot.plan = slot.plan, None  # before any await: a second settle finds nothing
        charges = _scaled(tokens, cost_usd, audio_seconds) if p.charged else {}
        if self._memory is not None:
            if p.concurrency or charges:
                self._memory.settle_now(p, charges, now)
        elif p.concurrency or charges:
            # It runs on if this task is cancelled: a release or a charge not sent would never be.
            await asyncio.shield(self._kept(self._settled(p, slot, charges, now, audio_seconds)))
            return
        if slot.audio_quotas:
            self._audio_done(slot, p, audio_seconds)

    async def _settled(self, p: Plan, slot: Slot, charges: dict[str, int], now: float,
                       audio_seconds: float | None) -> None:
        try:
            await self._store.settle(p, slot.id, charges, now)
        except Exception as e:  # noqa: BLE001 (settle runs in a finally, and nobody may be waiting for it)
            self._lost(now, "settle a request", e)
            self._unrelease(p, slot.id)
        finally:
            # Once the store has the charge (or failed), not when a cancelled caller stops waiting:
            # an admission meanwhile must find the upload's seconds claimed here or counted in the
            # store, never neither.
            if slot.audio_quotas:
                self._audio_done(slot, p, audio_seconds)

    async def settle_all(self, slots: Sequence[Slot | None], tokens: int | None, now: float,
                         cost_usd: float | None = None, audio_seconds: float | None = None) -> None:
        """settle() each slot, in order, even when the task is cancelled during one of them (the
        caller's leaving cancels a handler in its finally; an unsettled slot is held until its
        lease in Redis, for good in memory, and an audio claim has no lease): the cancellation is
        raised once all are settled."""
        cancelled: asyncio.CancelledError | None = None
        for slot in slots:
            try:
                await self.settle(slot, tokens, now, cost_usd, audio_seconds)
            except asyncio.CancelledError as exc:
                cancelled = exc
        if cancelled is not None:
            raise cancelled

    async def charge(self, slot: Slot | None, tokens: int | None, now: float, cost_usd: float | None = None,
                     audio_seconds: float | None = None, scope: str | None = None) -> list[Limit]:
        """Charge these amounts now, keeping the slot (a realtime session's usage as it is
        reported); the windows that are over their limit once charged. ``scope`` ("key"): to that
        scope's windows alone (a transcription by another model than the slot's). Never raises: a
        store error is counted as a lost charge and nothing is said to be over."""
        p = slot.plan if slot is not None else None
        if slot is None or p is None or not p.charged:
            return []
        if scope is not None:
            p = replace(p, charged=tuple(x for x in p.charged if x.scope == scope))
        charges = _scaled(tokens, cost_usd, audio_seconds)
        if not charges:
            return []
        return await asyncio.shield(self._kept(self._charged(p, slot, charges, now, audio_seconds)))  # runs on

    async def _charged(self, p: Plan, slot: Slot, charges: dict[str, int], now: float,
                       audio_seconds: float | None) -> list[Limit]:
        try:
            return await self._store.charge(p, charges, now)
        except Exception as e:  # noqa: BLE001 (a session must not end because the store failed)
            self._lost(now, "charge tokens", e)
            return []
        finally:  # as _settled's
            if slot.audio_quotas:
                self._audio_done(slot, p, audio_seconds)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GIVE_BACK_S
        # Cancelled admissions still waiting for their answers, the settles of the slots they took,
        # settles and charges whose callers were cancelled: each runs on, and is waited for here.
        while self._running_on and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._running_on), timeout=left)
        # Releases Redis did not take, which no next admission will send now: what is left of
        # the wait is theirs (else each holds its slot to the end of its lease, an hour).
        if self._unreleased and self._memory is None and (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError, *self._store_errors):
                async with asyncio.timeout(left):
                    await self._released(time.time())
        await self._store.close()


    def _warn(self, now: float, message: str, e: Exception) -> None:
        # Without a pause between warnings, a dead Redis writes one line per request.
        if abs(now - self._warned_at) >= _WARN_EVERY:
            self._warned_at = now
            log.warning(message, type(e).__name__, e)


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Marks a task's exception as seen: its awaiters, if any, were told."""
    if not task.cancelled():
        task.exception()


def _scaled(tokens: int | None, cost_usd: float | None, audio_seconds: float | None) -> dict[str, int]:
    """unit -> the amount as the stores keep it (tokens, micro-USD, milliseconds). An amount that
    is not finite once scaled (an upstream's reported 1e308 seconds) is no count and is left out:
    round() would raise, and settle, which must never raise, would keep the request's slot."""
    charges = {}
    for unit, amount in (("tokens", tokens), ("usd", cost_usd), ("seconds", audio_seconds)):
        if amount and amount > 0 and math.isfinite(scaled := amount * SCALE[unit]):
            charges[unit] = max(1, round(scaled))
    return charges
