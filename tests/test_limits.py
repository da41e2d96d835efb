"""Rate limits: the window math as plain functions, then both stores through the same tests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import pytest
import redis.asyncio

from aisix.config import ROUTES, ApiKey, Cooldown, Model, ProviderKey, RateLimit, Retry, Target
from aisix.specs import parse_backend
from aisix.errors import GatewayError, RateLimited
from aisix.limits import Limiter, Slot
from aisix.limits_plan import (MONTH, Limit, is_over, needing, plan, provider_plan, rejection, reset_after, window_end,
                               window_start)
from aisix.limits_redis import CONNECTIONS, STEP_S
from tests.redis_server import RedisServer, free_port, redis_url  # noqa: F401

T0 = 20000 * 86400.0  # a day boundary, so every window starts at T0
PROVIDER = ProviderKey("openai-main", "openai", "http://127.0.0.1:1", "sk-provider", "Authorization: Bearer sk-provider")


def api_key(name: str = "team-a", **limits: int) -> ApiKey:
    return ApiKey(name, "ab" * 32, ("*",), frozenset(), (), False, None, RateLimit(**limits) if limits else None)


def model(alias: str = "tts-prod", **limits: int) -> Model:
    return Model(alias, (Target(PROVIDER, "gpt-4o-mini-tts"),), None, RateLimit(**limits) if limits else None,
                 frozenset(ROUTES), Retry(1, 0), Cooldown())


def limits_of(key: ApiKey, m: Model) -> dict[str, Limit]:
    """'key.rpm' -> its Limit, for building refusals by hand."""
    return {f"{x.scope}.{x.field}": x
            for x in plan(key.name, key.rate_limit, m.alias, m.rate_limit).limits}


# -- [core] --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("now", "size", "start"), [
    (T0, 60, T0),
    (T0 + 59.999, 60, T0),
    (T0 + 60, 60, T0 + 60),
    (T0 + 0.5, 1, T0),
    (T0 + 1, 1, T0 + 1),
    (T0 + 3599.9, 3600, T0),
    (T0 + 7200, 3600, T0 + 7200),
    (T0 + 86399.9, 86400, T0),
    (T0 - 0.001, 86400, T0 - 86400),
])
def test_windows_are_aligned_to_the_clock(now: float, size: int, start: float) -> None:
    assert window_start(now, size) == start


@pytest.mark.parametrize(("now", "size", "seconds"), [
    (T0, 60, 60),  # a whole window ahead
    (T0 + 0.1, 60, 60),  # 59.9 s rounds up
    (T0 + 30.5, 60, 30),
    (T0 + 59, 60, 1),
    (T0 + 59.999, 60, 1),  # never 0
    (T0 + 0.5, 1, 1),
    (T0 + 60, 3600, 3540),
    (T0 + 86399.5, 86400, 1),
])
def test_retry_after_is_whole_seconds_to_the_window_end_rounded_up(now: float, size: int, seconds: int) -> None:
    assert reset_after(now, size) == seconds


@pytest.mark.parametrize(("field", "limit", "count", "over"), [
    ("rpm", 3, 2, False),
    ("rpm", 3, 3, True),  # requests: the limit-th request was the last admitted
    ("tpm", 100, 100, False),  # tokens: at the limit still admits
    ("tpm", 100, 101, True),  # only a count over it refuses
    ("concurrency", 2, 1, False),
    ("concurrency", 2, 2, True),
])
def test_what_count_refuses(field: str, limit: int, count: int, over: bool) -> None:
    x = limits_of(api_key(**{field: limit}), model())[f"key.{field}"]
    assert is_over(x, count) is over


KEY = api_key(rps=1, rpm=60, rph=100, rpd=1000, tpm=500, tpd=5000, concurrency=4)
MODEL = model(rpm=600, rpd=1000, tpd=9000, concurrency=32)


@pytest.mark.parametrize(("blocked", "now", "scope", "headers", "message"), [
    (["key.rpm"], T0 + 15, "key",
     {"Retry-After": "45", "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
      "x-ratelimit-reset-requests": "45"},
     "Rate limit of 60 requests per minute exceeded for this API key."),
    (["key.rps", "key.rpm", "key.rph"], T0 + 15.5, "key",  # the hour ends last
     {"Retry-After": "3585", "x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "0",
      "x-ratelimit-reset-requests": "3585", "x-should-retry": "false"},
     "Rate limit of 100 requests per hour exceeded for this API key."),
    (["key.rpm", "model.tpd"], T0 + 30, "model",
     {"Retry-After": "86370", "x-ratelimit-limit-tokens": "9000", "x-ratelimit-remaining-tokens": "0",
      "x-ratelimit-reset-tokens": "86370", "x-should-retry": "false"},
     "Rate limit of 9000 tokens per day exceeded for model 'tts-prod'."),
    (["key.tpm"], T0 + 59.2, "key",
     {"Retry-After": "1", "x-ratelimit-limit-tokens": "500", "x-ratelimit-remaining-tokens": "0",
      "x-ratelimit-reset-tokens": "1"},
     "Rate limit of 500 tokens per minute exceeded for this API key."),
    (["key.rpd", "model.rpd"], T0, "key",  # a tie: the key's, which comes first
     {"Retry-After": "86400", "x-ratelimit-limit-requests": "1000", "x-ratelimit-remaining-requests": "0",
      "x-ratelimit-reset-requests": "86400", "x-should-retry": "false"},
     "Rate limit of 1000 requests per day exceeded for this API key."),
    (["key.concurrency", "key.rps"], T0 + 0.25, "key",  # a window's wait is known, so it wins
     {"Retry-After": "1", "x-ratelimit-limit-requests": "1", "x-ratelimit-remaining-requests": "0",
      "x-ratelimit-reset-requests": "1"},
     "Rate limit of 1 requests per second exceeded for this API key."),
    (["model.concurrency"], T0, "model", {"Retry-After": "1"},
     "Concurrency limit of 32 requests in flight exceeded for model 'tts-prod'."),
])
def test_the_refusal_describes_the_window_that_resets_last(
        blocked: list[str], now: float, scope: str, headers: dict[str, str], message: str) -> None:
    by_name = limits_of(KEY, MODEL)
    e = rejection([by_name[b] for b in blocked], now)
    assert isinstance(e, GatewayError)
    assert (e.status, e.type, e.param) == (429, "rate_limit_error", None)
    assert e.code == ("concurrency_limit_exceeded" if headers.keys() == {"Retry-After"} else "rate_limit_exceeded")
    assert (e.scope, e.headers, e.message) == (scope, headers, message)
    assert KEY.key_hash not in e.message


def test_a_plan_is_built_once_per_pair_in_a_fixed_order() -> None:
    p = plan(KEY.name, KEY.rate_limit, MODEL.alias, MODEL.rate_limit)
    assert p is plan(KEY.name, KEY.rate_limit, MODEL.alias, MODEL.rate_limit)
    assert [f"{x.scope}.{x.field}" for x in p.limits] == [
        "key.rps", "key.rpm", "key.rph", "key.rpd", "key.tpm", "key.tpd", "key.concurrency",
        "model.rpm", "model.rpd", "model.tpd", "model.concurrency"]
    assert [x.field for x in p.charged] == ["tpm", "tpd", "tpd"]
    assert [x.scope for x in p.concurrency] == ["key", "model"]
    assert {x.key for x in p.limits} >= {"aisix:rl:key:team-a:rpm", "aisix:rl:model:tts-prod:concurrency"}


# -- both stores ---------------------------------------------------------------------------------

async def flush(url: str) -> None:
    r = redis.asyncio.Redis.from_url(url)
    try:
        await r.flushdb()
    finally:
        await r.aclose()


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[Limiter]:
    backend = "memory"
    if request.param == "redis":
        backend = request.getfixturevalue("redis_url")
        await flush(backend)
    lim = Limiter.create(parse_backend(backend))
    try:
        yield lim
    finally:
        await lim.close()
    assert (lim.fail_open_total, lim.settle_errors_total) == (0, 0)  # the store answered every call


async def refusal(lim: Limiter, key: ApiKey, m: Model, now: float) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        await lim.admit(key, m, now)
    return caught.value


async def test_no_limits_means_no_slot(limiter: Limiter) -> None:
    assert await limiter.admit(api_key(), model(), T0) is None
    assert await limiter.admit(api_key(), model(rpm=None), T0) is None  # an empty RateLimit, too
    await limiter.settle(None, 100, T0)


async def test_rpm_admits_exactly_the_limit_then_refuses_until_the_next_minute(limiter: Limiter) -> None:
    key, m = api_key(rpm=3), model()
    for _ in range(3):
        assert isinstance(await limiter.admit(key, m, T0 + 15), Slot)
    e = await refusal(limiter, key, m, T0 + 15)
    assert (e.status, e.code, e.scope) == (429, "rate_limit_exceeded", "key")
    assert e.headers == {"Retry-After": "45", "x-ratelimit-limit-requests": "3",
                         "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "45"}
    assert e.message == "Rate limit of 3 requests per minute exceeded for this API key."
    await refusal(limiter, key, m, T0 + 59.99)
    for _ in range(3):  # a new window, a new count
        await limiter.admit(key, m, T0 + 60)
    await refusal(limiter, key, m, T0 + 60.5)


async def test_a_model_limit_is_shared_by_every_key(limiter: Limiter) -> None:
    a, b, m = api_key("team-a"), api_key("team-b"), model(rpm=2)
    await limiter.admit(a, m, T0)
    await limiter.admit(b, m, T0)
    for key in (a, b):
        e = await refusal(limiter, key, m, T0 + 1)
        assert e.scope == "model"
        assert e.message == "Rate limit of 2 requests per minute exceeded for model 'tts-prod'."
    await limiter.admit(a, model("whisper-prod", rpm=2), T0)  # another model, another count


async def test_a_refused_admission_counts_nothing(limiter: Limiter) -> None:
    a, b, m = api_key("team-a", rpm=1), api_key("team-b"), model(rpm=4)
    await limiter.admit(a, m, T0)
    for _ in range(10):  # refused by the key: the model's count stays put
        assert (await refusal(limiter, a, m, T0)).scope == "key"
    for _ in range(3):
        await limiter.admit(b, m, T0)
    assert (await refusal(limiter, b, m, T0)).scope == "model"
    c = api_key("team-c", concurrency=1)
    for _ in range(3):  # refused by the model: the key's one slot is not taken
        assert (await refusal(limiter, c, m, T0)).scope == "model"
    await limiter.settle(await limiter.admit(c, model("whisper-prod"), T0), None, T0)


async def test_a_concurrency_slot_is_held_until_settled_once(limiter: Limiter) -> None:
    key, m = api_key(concurrency=1), model()
    first = await limiter.admit(key, m, T0)
    e = await refusal(limiter, key, m, T0 + 1)
    assert (e.code, e.headers, e.scope) == ("concurrency_limit_exceeded", {"Retry-After": "1"}, "key")
    assert e.message == "Concurrency limit of 1 requests in flight exceeded for this API key."
    await limiter.settle(first, None, T0 + 2)
    second = await limiter.admit(key, m, T0 + 3)
    await limiter.settle(first, None, T0 + 4)  # a second settle must not free the second slot
    await refusal(limiter, key, m, T0 + 5)
    await limiter.settle(second, None, T0 + 6)
    await limiter.settle(second, None, T0 + 6)
    await limiter.settle(await limiter.admit(key, m, T0 + 7), None, T0 + 8)


async def test_a_model_concurrency_is_shared_by_every_key(limiter: Limiter) -> None:
    m = model(concurrency=2)
    slots = [await limiter.admit(api_key(name), m, T0) for name in ("team-a", "team-b")]
    assert (await refusal(limiter, api_key("team-c"), m, T0)).scope == "model"
    await limiter.settle(slots[0], None, T0)
    await limiter.admit(api_key("team-c"), m, T0)


async def test_tokens_settled_refuse_the_next_request_once_over_the_limit(limiter: Limiter) -> None:
    key, m = api_key(tpm=100), model()
    await limiter.settle(await limiter.admit(key, m, T0 + 1), 100, T0 + 2)
    slot = await limiter.admit(key, m, T0 + 3)  # at the limit: still admitted
    await limiter.settle(slot, 1, T0 + 4)
    await limiter.settle(slot, 1000, T0 + 4)  # settled already: not charged again
    e = await refusal(limiter, key, m, T0 + 40)
    assert (e.code, e.scope) == ("rate_limit_exceeded", "key")
    assert e.headers == {"Retry-After": "20", "x-ratelimit-limit-tokens": "100",
                         "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "20"}
    assert e.message == "Rate limit of 100 tokens per minute exceeded for this API key."
    await limiter.settle(await limiter.admit(key, m, T0 + 60), None, T0 + 61)  # the next minute


async def test_model_tokens_are_charged_in_the_window_of_the_settle(limiter: Limiter) -> None:
    m = model(tpd=50)
    slot = await limiter.admit(api_key("team-a"), m, T0 + 86399)
    await limiter.settle(slot, 51, T0 + 86400)  # the answer ended the next day
    await limiter.admit(api_key("team-b"), m, T0 + 86399.5)
    e = await refusal(limiter, api_key("team-b"), m, T0 + 86400.5)
    assert (e.scope, e.headers["x-ratelimit-limit-tokens"], e.headers["Retry-After"]) == ("model", "50", "86400")


def test_a_budget_message_writes_small_amounts_plainly() -> None:
    from aisix import errors

    assert "Budget of 0.00001 USD per day" in errors.budget_exceeded("key", "this API key", 0.00001, "day", 5).message
    assert "Budget of 2.5 USD per month" in errors.budget_exceeded("key", "this API key", 2.5, "month", 5).message


def test_a_month_is_the_utc_calendar_month() -> None:
    import calendar

    mid_feb = calendar.timegm((2027, 2, 14, 12, 0, 0))
    assert (window_start(mid_feb, MONTH), window_end(mid_feb, MONTH)) == (
        calendar.timegm((2027, 2, 1, 0, 0, 0)), calendar.timegm((2027, 3, 1, 0, 0, 0)))
    december = calendar.timegm((2026, 12, 31, 23, 59, 59))
    assert window_end(december, MONTH) == calendar.timegm((2027, 1, 1, 0, 0, 0))
    assert reset_after(december, MONTH) == 1


async def test_a_cost_budget_refuses_once_spent_until_the_day_ends(limiter: Limiter) -> None:
    key, m = api_key(cost_usd_per_day=1.0), model()
    await limiter.settle(await limiter.admit(key, m, T0 + 10), None, T0 + 11, cost_usd=0.6)
    slot = await limiter.admit(key, m, T0 + 20)  # 0.60 spent of 1.00: admitted
    await limiter.settle(slot, None, T0 + 21, cost_usd=0.5)  # the answer costs what it costs
    e = await refusal(limiter, key, m, T0 + 3600)
    assert (e.status, e.code, e.scope) == (429, "budget_exceeded", "key")
    assert e.headers == {"Retry-After": str(86400 - 3600), "x-should-retry": "false"}
    assert e.message == "Budget of 1 USD per day exceeded for this API key."
    await limiter.settle(await limiter.admit(key, m, T0 + 86400), None, T0 + 86401)  # a new day


async def test_a_monthly_budget_on_a_model_is_shared_by_keys(limiter: Limiter) -> None:
    m = model(cost_usd_per_month=2.5)
    await limiter.settle(await limiter.admit(api_key("team-a"), m, T0), None, T0, cost_usd=2.500001)
    e = await refusal(limiter, api_key("team-b"), m, T0 + 5)
    assert (e.code, e.scope) == ("budget_exceeded", "model")
    assert int(e.headers["Retry-After"]) == window_end(T0 + 5, MONTH) - int(T0 + 5)


async def test_uploads_in_flight_together_cannot_spend_the_same_audio_left(limiter: Limiter) -> None:
    # Admitted together, both see 100 s left; what one claims (its header's length, or what has
    # streamed) is not there for the other, and a claim becomes a charge at settle.
    key, m = api_key(audio_seconds_per_hour=100), model()
    a, b = await limiter.admit(key, m, T0), await limiter.admit(key, m, T0)
    assert limiter.audio_refusal(a, 60.0, T0) is None
    e = limiter.audio_refusal(b, 60.0, T0)
    assert e is not None and e.code == "rate_limit_exceeded" and "Audio quota of 100 seconds" in e.message
    assert limiter.audio_refusal(b, 40.0, T0) is None  # what a left
    assert limiter.audio_refusal(a, 61.0, T0) is not None  # a cannot grow into b's claim either
    await limiter.settle(a, None, T0 + 1, audio_seconds=60.0)
    assert limiter.audio_refusal(b, 40.0, T0 + 1) is None  # a's claim is now a's charge: the same 40
    assert limiter.audio_refusal(b, 40.5, T0 + 1) is not None
    c = await limiter.admit(key, m, T0 + 2)  # sees a's 60 s charged, and b's claim of 40
    assert c is not None and c.audio_left == 40.0
    assert limiter.audio_refusal(c, 1.0, T0 + 2) is not None
    await limiter.settle(b, None, T0 + 3)  # b failed upstream: nothing charged, its claim given back
    assert limiter.audio_refusal(c, 40.0, T0 + 3) is None


async def test_an_upload_charged_past_its_claim_is_felt_by_uploads_still_in_flight(limiter: Limiter) -> None:
    # a claimed 60 s but is charged 75 (the upstream reported more): b, within its own claim of
    # 40, and c, of unknown length so far, are over now, and must hear it on their next chunk.
    key, m = api_key(audio_seconds_per_hour=100), model()
    a, b, c = [await limiter.admit(key, m, T0) for _ in range(3)]
    assert limiter.audio_refusal(a, 60.0, T0) is None
    assert limiter.audio_refusal(b, 40.0, T0) is None
    assert limiter.audio_refusal(c, 0.0, T0) is None
    await limiter.settle(a, None, T0 + 1, audio_seconds=75.0)
    assert limiter.audio_refusal(b, 40.0, T0 + 1) is not None
    assert limiter.audio_refusal(c, 0.0, T0 + 1) is not None


async def test_settle_all_settles_every_slot_through_a_cancellation() -> None:
    # A store whose settle waits (as Redis does), and a task cancelled while it waits on the
    # first slot (a caller leaving during a handler's finally): the second slot is settled too,
    # then the cancellation goes on.
    from aisix.limits_memory import MemoryStore

    class Waiting(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.immediate = None
            self.waiting = asyncio.Event()

        async def settle(self, plan: Any, slot_id: str, charges: dict[str, int], now: float) -> None:
            self.settle_calls += 1
            if self.settle_calls == 1:  # the first waits, until the task is cancelled
                self.waiting.set()
                await asyncio.Event().wait()
            self.settle_now(plan, charges, now)

        settle_calls = 0

    store = Waiting()
    lim = Limiter(store)
    key, m = api_key(), model(concurrency=2)
    a, b = await lim.admit(key, m, T0), await lim.admit(key, m, T0)
    task = asyncio.create_task(lim.settle_all((a, b), None, T0))
    await store.waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.settle_calls == 2 and a is not None and b is not None and a.plan is None and b.plan is None
    await lim.settle(await lim.admit(key, m, T0), None, T0)  # b's slot was given back: room again


async def test_audio_quota_is_charged_and_tells_what_is_left(limiter: Limiter) -> None:
    key, m = api_key(audio_seconds_per_hour=100), model(audio_seconds_per_day=1000)
    slot = await limiter.admit(key, m, T0 + 1)
    assert isinstance(slot, Slot) and slot.audio_left == 100.0
    await limiter.settle(slot, None, T0 + 2, audio_seconds=60.25)
    slot = await limiter.admit(key, m, T0 + 3)
    assert slot is not None and slot.audio_left == pytest.approx(39.75)
    assert limiter.audio_refusal(slot, 39.0, T0 + 3) is None
    e = limiter.audio_refusal(slot, 40.0, T0 + 3)  # an upload longer than what is left
    assert e is not None and (e.code, e.scope, e.headers) == ("rate_limit_exceeded", "key", {"Retry-After": "3597", "x-should-retry": "false"})
    # not "exceeded": the quota has 39.75 s left, a shorter upload is still taken
    assert e.message == ("Audio quota of 100 seconds per hour for this API key: 39.8 seconds left, "
                         "and the audio file is 40.0 seconds long.")
    e = limiter.audio_refusal(slot, 39.76, T0 + 3, at_least=True)
    assert e is not None and e.message == ("Audio quota of 100 seconds per hour for this API key: 39.750 seconds "
                                           "left, and the audio file is at least 39.760 seconds long.")
    await limiter.settle(slot, None, T0 + 4, audio_seconds=40)
    e = await refusal(limiter, key, m, T0 + 5)  # 100.25 s charged: over
    assert e.code == "rate_limit_exceeded" and "Audio quota" in e.message


# -- Redis ---------------------------------------------------------------------------------------

@pytest.fixture
async def shared(redis_url: str) -> AsyncIterator[tuple[Limiter, Limiter]]:  # noqa: F811
    """Two gateway instances on one Redis: two limiters, two connection pools."""
    await flush(redis_url)
    pair = (Limiter.create(parse_backend(redis_url)), Limiter.create(parse_backend(redis_url)))
    yield pair
    for lim in pair:
        await lim.close()


@pytest.mark.parametrize("limits", [{"rpm": 50}, {"concurrency": 50}, {"rph": 80, "rpm": 50}])
async def test_two_instances_never_admit_past_the_limit_together(
        shared: tuple[Limiter, Limiter], limits: dict[str, int]) -> None:
    key, m = api_key(), model(**limits)

    async def one(i: int) -> bool:
        try:
            await shared[i % 2].admit(key, m, T0 + 30)
        except RateLimited:
            return False
        return True

    admitted = await asyncio.gather(*(one(i) for i in range(200)))
    assert sum(admitted) == 50
    assert sum(lim.fail_open_total for lim in shared) == 0


async def test_a_stalled_loop_during_a_bursts_first_connects_still_admits_exactly(
        shared: tuple[Limiter, Limiter]) -> None:
    # A burst on fresh pools opens many connections at once; on a busy machine the event loop
    # falls behind (CPU, a collection) and each connect's timeout runs meanwhile. 0.7 s without
    # the loop, just after the connects start, failed them all open with a 0.5 s connect timeout
    # (CI saw 67 admitted against a limit of 50).
    key, m = api_key(), model(rpm=50)

    async def one(i: int) -> bool:
        try:
            await shared[i % 2].admit(key, m, T0 + 30)
        except RateLimited:
            return False
        return True

    burst = asyncio.gather(*(one(i) for i in range(200)))
    asyncio.get_running_loop().call_soon(time.sleep, 0.7)  # runs after each admission's first step
    assert sum(await burst) == 50
    assert sum(lim.fail_open_total for lim in shared) == 0


async def test_after_a_store_failure_one_request_at_a_time_waits_on_it() -> None:
    # A Redis that accepts and never answers: every command waits out its timeout. Once the pause
    # after the first failure is over, one admission tries it again and the others in the
    # meantime go on unchecked at once, rather than each waiting out the timeouts. (The clock
    # given moves as the waits do: a failure comes a timeout, STEP_S, after its call began.)
    async with _mute_redis() as (lim, accepted):
        key, m = api_key(rpm=1), model()
        await lim.admit(key, m, T0)  # waits out the timeout, fails open
        assert (len(accepted), lim.fail_open_total) == (1, 1)
        probe = asyncio.ensure_future(lim.admit(key, m, T0 + 3))  # the pause after it is over
        others = await asyncio.gather(*(lim.admit(key, m, T0 + 3) for _ in range(20)))
        assert all(isinstance(s, Slot) and s.plan is None for s in others)  # unchecked
        assert not probe.done()
        assert isinstance(await probe, Slot) and len(accepted) == 2  # one connection more, not 21
        assert lim.fail_open_total == 22
        assert await lim.cooling(["a|b"], T0 + 4.5) == {}  # paused again: not even asked
        assert len(accepted) == 2


async def test_the_pause_after_a_store_failure_runs_from_the_failure() -> None:
    # A call that failed by timing out began a timeout (STEP_S, as long as the pause) earlier:
    # a pause counted from its beginning was over when it failed, and the next call waited on
    # the dead store again at once; every request was a probe, one after the other.
    async with _mute_redis() as (lim, accepted):
        key, m = api_key(rpm=1), model()
        began = time.monotonic()
        await lim.admit(key, m, T0)
        took = time.monotonic() - began
        assert took >= STEP_S and (len(accepted), lim.fail_open_total) == (1, 1)
        quick = time.monotonic()
        slot = await lim.admit(key, m, T0 + took + 0.5)  # half a pause after the failure
        assert isinstance(slot, Slot) and slot.plan is None and time.monotonic() - quick < STEP_S / 2
        assert (len(accepted), lim.fail_open_total) == (1, 2)  # not asked


@contextlib.asynccontextmanager
async def _mute_redis() -> AsyncIterator[tuple[Limiter, list[asyncio.StreamWriter]]]:
    """A Limiter on a Redis that accepts connections (listed) and never answers."""
    accepted: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    lim = Limiter.create(parse_backend(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"))
    try:
        yield lim, accepted
    finally:
        await lim.close()
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()


async def test_a_burst_shares_a_bounded_pool_of_redis_connections(
        shared: tuple[Limiter, Limiter], redis_url: str) -> None:  # noqa: F811
    # 300 admissions at once through one instance: they wait for one of its CONNECTIONS rather
    # than opening 300 (each a connect that can time out and fail open under load), and all pass.
    # The pool is opened first, by as many admissions as it has connections (opening 64 at once
    # on a starved machine is the test above): an unbounded pool still opens 300 below, and the
    # count of clients at the end finds it.
    key, m = api_key(), model(rpm=1000)
    await asyncio.gather(*(shared[0].admit(key, m, T0 + 30) for _ in range(CONNECTIONS)))
    warm = shared[0].fail_open_total
    slots = await asyncio.gather(*(shared[0].admit(key, m, T0 + 30) for _ in range(300)))
    assert len(slots) == 300 and shared[0].fail_open_total == warm
    r = redis.asyncio.Redis.from_url(redis_url)
    try:
        clients = (await r.info("clients"))["connected_clients"]
    finally:
        await r.aclose()
    assert clients <= CONNECTIONS + 1  # this one's own


async def test_redis_counters_are_named_by_scope_and_expire(shared: tuple[Limiter, Limiter], redis_url: str) -> None:  # noqa: F811
    lim = shared[0]
    slot = await lim.admit(api_key(rpm=5, tpm=10), model(concurrency=3), T0 + 10)
    await lim.settle(slot, 7, T0 + 11)
    r = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = sorted(await r.keys("*"))
        assert keys == [f"aisix:rl:key:team-a:rpm:{int(T0)}", f"aisix:rl:key:team-a:tpm:{int(T0)}"]
        assert await r.get(keys[1]) == "7"
        for k in keys:
            assert 60 < await r.ttl(k) <= 120  # the window, plus a margin for clock skew
        await lim.admit(api_key(), model(concurrency=3), T0 + 12)
        assert await r.zcard("aisix:rl:model:tts-prod:concurrency") == 1
        assert 0 < await r.ttl("aisix:rl:model:tts-prod:concurrency") <= 3600
    finally:
        await r.aclose()


async def test_a_slot_never_settled_ends_with_its_lease(shared: tuple[Limiter, Limiter]) -> None:
    dead, alive = shared  # `dead` admits and never settles, like a process that died
    key, m = api_key(), model(concurrency=1)
    await dead.admit(key, m, T0)
    await refusal(alive, key, m, T0 + 3599)
    await alive.settle(await alive.admit(key, m, T0 + 3600.5), None, T0 + 3601)


async def test_a_slot_whose_admission_was_cancelled_is_given_back(
        shared: tuple[Limiter, Limiter], redis_url: str) -> None:  # noqa: F811
    """A caller that leaves (handler_cancellation cancels the handler) after Redis ran the
    admission and before its answer was read: the slot the script took must come back when that
    answer comes, not an hour later with its lease."""
    other = shared[1]
    key, m = api_key(), model(concurrency=1)
    async with _behind_a_holding_proxy(redis_url) as (proxy, lim, r):
        await lim.settle(await lim.admit(key, m, T0), None, T0)  # the script loaded, a connection open
        proxy.holding = True
        admitting = asyncio.create_task(lim.admit(key, m, T0 + 1))
        await proxy.held.wait()  # the script ran in Redis: its answer is on its way, held
        assert await r.zcard(ZSET) == 1
        admitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admitting
        proxy.release.set()  # the answer goes on, to a connection still waiting for it or not
        assert await _polled(lambda: r.zcard(ZSET), 0) == 0
        await other.settle(await other.admit(key, m, T0 + 2), None, T0 + 2)  # the slot is free
        assert lim.fail_open_total == 0


async def test_close_waits_for_a_cancelled_admission_still_in_flight(redis_url: str) -> None:  # noqa: F811
    """At shutdown aiohttp cancels the handlers still running, then closes the limiter: an
    admission cancelled then, whose answer is still coming, must have its slot given back before
    the store is closed under it."""
    key, m = api_key(), model(concurrency=1)
    async with _behind_a_holding_proxy(redis_url) as (proxy, lim, r):
        await lim.settle(await lim.admit(key, m, T0), None, T0)
        proxy.holding = True
        admitting = asyncio.create_task(lim.admit(key, m, T0 + 1))
        await proxy.held.wait()  # the script ran: the slot is taken, its answer held
        admitting.cancel()
        await asyncio.gather(admitting, return_exceptions=True)
        asyncio.get_running_loop().call_later(0.05, proxy.release.set)  # the answer comes during close()
        await lim.close()
        assert await r.zcard(ZSET) == 0


async def test_a_settle_cancelled_before_its_zrem_was_sent_still_gives_the_slot_back(
        redis_url: str) -> None:  # noqa: F811
    """A handler cancelled while it settles (the caller leaving as the handler's finally gives the
    slot back): settle() marks the slot settled before its first await, so a ZREM not sent yet
    would never be."""
    async with _behind_a_holding_proxy(redis_url) as (proxy, lim, r):
        slot = await lim.admit(api_key(), model(concurrency=1), T0)
        assert await r.zcard(ZSET) == 1
        await proxy.cancel_before_sent(lim, lambda: lim.settle(slot, None, T0 + 1))
        assert await _polled(lambda: r.zcard(ZSET), 0) == 0


async def test_a_charge_cancelled_before_it_was_sent_still_reaches_redis(redis_url: str) -> None:  # noqa: F811
    """A realtime session's usage is charged as it is reported, by the pump that relays it; a
    session that ends then cancels the pump. The tokens (and cost) must still be charged."""
    tpm = f"aisix:rl:key:team-a:tpm:{int(T0)}"
    async with _behind_a_holding_proxy(redis_url) as (proxy, lim, r):
        slot = await lim.admit(api_key(tpm=1000), model(), T0)
        await proxy.cancel_before_sent(lim, lambda: lim.charge(slot, 70, T0 + 1))
        assert await _polled(lambda: r.get(tpm), "70") == "70"
        await lim.settle(slot, None, T0 + 2)


async def test_an_upload_settled_and_cancelled_is_counted_somewhere_until_redis_has_its_charge(
        redis_url: str) -> None:  # noqa: F811
    """A handler cancelled while it settles an upload's 60 s (the caller leaving): the charge runs
    on, and until Redis has it those seconds must stay claimed here. Counted as charged at once,
    an upload admitted meanwhile reads a store without them and a process that no longer claims
    them: it would be let spend them again."""
    key, m = api_key(audio_seconds_per_hour=100), model()
    async with _behind_a_holding_proxy(redis_url) as (proxy, lim, r):
        a = await lim.admit(key, m, T0)
        assert lim.audio_refusal(a, 60.0, T0) is None
        proxy.holding = True
        busy = asyncio.create_task(lim.cooling(["x"], T0))  # the pooled connection, held
        await proxy.held.wait()
        proxy.held.clear()
        settling = asyncio.create_task(lim.settle(a, None, T0 + 1, audio_seconds=60.0))
        await proxy.held.wait()  # on a connection of its own, whose handshake's answer is held
        settling.cancel()
        await asyncio.gather(settling, return_exceptions=True)
        proxy.holding = False  # a third connection's answers pass; the two held stay so
        b = await lim.admit(key, m, T0 + 2)
        assert b is not None and b.audio_left == 100.0  # Redis has not counted a's seconds yet
        assert lim.audio_refusal(b, 41.0, T0 + 2) is not None
        proxy.release.set()
        await busy
        hour = f"aisix:rl:key:team-a:audio_seconds_per_hour:{int(T0) // 3600 * 3600}"
        assert await _polled(lambda: r.get(hour), "60000") == "60000"
        assert lim.audio_refusal(b, 41.0, T0 + 3) is not None  # now counted as charged, once
        assert lim.audio_refusal(b, 40.0, T0 + 3) is None
        await lim.settle(b, None, T0 + 4)


async def test_a_release_redis_did_not_take_is_given_back_before_the_next_admission(
        redis_url: str) -> None:  # noqa: F811
    """A blip in Redis as a request ends loses its slot's release: with concurrency 1, the key
    was shut until the slot's lease ran out, an hour. The release is retried before the next
    admission Redis answers. So is the slot of an admission whose answer was lost."""
    key, m = api_key(), model(concurrency=1)
    async with _behind_a_holding_proxy(redis_url) as (proxy, lim, r):
        slot = await lim.admit(key, m, T0)
        assert await r.zcard(ZSET) == 1
        proxy.cut = True  # every connection closed as it gets data
        await lim.settle(slot, None, T0 + 1)
        assert lim.settle_errors_total == 1 and await r.zcard(ZSET) == 1
        proxy.cut = False
        other = await lim.admit(key, m, T0 + 2)
        assert other is not None and other.plan is not None  # admitted, not failed open
        assert await r.zcard(ZSET) == 1  # the new slot alone
        proxy.cut = True
        assert (await lim.admit(key, m, T0 + 3)).plan is None  # failed open: the script may have run
        proxy.cut = False
        await lim.settle(other, None, T0 + 4)
        assert lim.fail_open_total == 1 and await r.zcard(ZSET) == 0
        third = await lim.admit(key, m, T0 + 5)
        assert third is not None and third.plan is not None
        await lim.settle(third, None, T0 + 6)


async def test_a_probe_that_finds_redis_still_down_adds_no_slot_to_give_back(redis_url: str) -> None:  # noqa: F811
    """While releases wait to be given back, each probe of a Redis still down failed in that
    release, before its own admission was sent, and yet queued its own slot as one the script
    may have taken: one more ZREM per probe (one a second or so through an outage, up to 4096),
    sent one by one before the first admission once Redis is back, every admission waiting."""
    key, m = api_key(), model(concurrency=1)
    async with _behind_a_holding_proxy(redis_url) as (proxy, lim, r):
        slot = await lim.admit(key, m, T0)
        proxy.cut = True
        await lim.settle(slot, None, T0 + 1)  # a release lost: to be given back
        for i in range(5):  # each one a probe (the pause is over), failing open
            assert (await lim.admit(key, m, T0 + 10 + 10 * i)).plan is None
        assert lim.fail_open_total == 5
        proxy.cut = False
        await r.config_resetstat()
        other = await lim.admit(key, m, T0 + 100)
        assert other is not None and other.plan is not None
        assert (await r.info("commandstats"))["cmdstat_zrem"]["calls"] == 1  # the lost release alone
        assert await r.zcard(ZSET) == 1
        await lim.settle(other, None, T0 + 101)


async def test_a_release_redis_did_not_take_is_given_back_at_close(redis_url: str) -> None:  # noqa: F811
    """A release lost to a blip, then the process stops (a drain, a restart) before any other
    admission: close() gives the limiter's last releases up to GIVE_BACK_S, and Redis answers
    again, but the slot was left to its lease, the key shut for an hour at concurrency 1."""
    key, m = api_key(), model(concurrency=1)
    async with _behind_a_holding_proxy(redis_url) as (proxy, lim, r):
        slot = await lim.admit(key, m, T0)
        proxy.cut = True
        await lim.settle(slot, None, T0 + 1)
        assert lim.settle_errors_total == 1 and await r.zcard(ZSET) == 1
        proxy.cut = False
        await lim.close()
        assert await r.zcard(ZSET) == 0


async def test_a_target_failure_cancelled_before_it_was_sent_still_reaches_redis(
        redis_url: str) -> None:  # noqa: F811
    """A caller that leaves as its attempt fails cancels the handler while the failure is being
    recorded: the failure must still count towards the target's cooldown."""
    async with _behind_a_holding_proxy(redis_url) as (proxy, lim, r):
        await proxy.cancel_before_sent(lim, lambda: lim.failed("t1", Cooldown(failures=1), T0))
        assert await _polled(lambda: r.exists("aisix:cd:t1:until"), 1) == 1


ZSET = "aisix:rl:model:tts-prod:concurrency"


@contextlib.asynccontextmanager
async def _behind_a_holding_proxy(url: str) -> AsyncIterator[tuple[_HoldingRedis, Limiter, redis.asyncio.Redis]]:
    """An empty Redis at ``url``, a Limiter on it through a _HoldingRedis, and a client of its own."""
    await flush(url)
    async with _HoldingRedis(url) as proxy:
        lim = Limiter.create(parse_backend(proxy.url))
        r = redis.asyncio.Redis.from_url(url, decode_responses=True)
        try:
            yield proxy, lim, r
        finally:
            await lim.close()
            await r.aclose()


async def _polled(read: Any, expected: Any) -> Any:
    """read() until it gives ``expected``, for up to 5 s; what it gave last."""
    for _ in range(500):
        if (got := await read()) == expected:
            break
        await asyncio.sleep(0.01)
    return got


class _HoldingRedis:
    """A proxy to the real Redis at ``url`` that, once ``holding``, holds back Redis's next
    answer (``held`` is set then) until ``release`` is set; ``asked`` is set whenever it passes
    on what a client sent."""

    def __init__(self, url: str) -> None:
        self.host, port = url.removeprefix("redis://").split("/")[0].split(":")
        self.port = int(port)
        self.holding = False
        self.cut = False  # while True, a connection that carries anything is closed at once
        self.held, self.release, self.asked = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> _HoldingRedis:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        for w in self._writers:
            w.close()
        for t in self._tasks:
            t.cancel()
        self._server.close()
        await self._server.wait_closed()

    async def cancel_before_sent(self, lim: Limiter, call: Any) -> None:
        """Starts call() while the limiter's one pooled connection waits for a held answer, so
        that it opens a connection of its own; cancels it once it has sent its first bytes there
        (the connection's handshake, whose answers are held too), then lets every answer through."""
        self.holding = True
        busy = asyncio.create_task(lim.cooling(["x"], T0))
        await self.held.wait()
        self.asked.clear()
        task = asyncio.create_task(call())
        await self.asked.wait()
        task.cancel()
        self.release.set()
        await asyncio.gather(task, busy, return_exceptions=True)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._writers += [writer, up_writer]
        self._tasks.append(asyncio.create_task(self._pump(reader, up_writer, answers=False)))
        self._tasks.append(asyncio.create_task(self._pump(up_reader, writer, answers=True)))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answers: bool) -> None:
        while data := await reader.read(65536):
            if self.cut:
                break
            if answers and self.holding:
                self.held.set()
                await self.release.wait()
            if writer.is_closing():
                return
            writer.write(data)
            if not answers:
                self.asked.set()
        writer.close()


async def test_an_unreachable_redis_fails_open(caplog: pytest.LogCaptureFixture) -> None:
    lim = Limiter.create(parse_backend(f"redis://127.0.0.1:{free_port()}/0"))
    key, m = api_key(rpm=1, concurrency=1), model()
    with caplog.at_level(logging.WARNING, logger="aisix.limits"):
        slots = [await lim.admit(key, m, T0 + t) for t in (0, 0.5, 2, 3, 12)]
    assert all(isinstance(s, Slot) for s in slots)
    assert lim.fail_open_total == 5
    assert len(caplog.records) == 2  # at most one warning per 10 s
    for s in slots:
        await lim.settle(s, 100, T0 + 13)  # nothing was taken, nothing to give back
    assert lim.settle_errors_total == 0
    await lim.close()


async def test_the_limiter_recovers_when_redis_comes_back() -> None:
    server = RedisServer().start()
    lim = Limiter.create(parse_backend(server.url))
    try:
        key, m = api_key(rpm=1), model(concurrency=5)
        held = await lim.admit(key, m, T0)
        server.stop()
        assert isinstance(await lim.admit(key, m, T0 + 1), Slot)  # admitted unchecked
        assert lim.fail_open_total == 1
        await lim.settle(held, None, T0 + 1)  # lost, and counted; its lease will end it
        assert lim.settle_errors_total == 1
        server.start()  # same port, empty
        await lim.admit(key, m, T0 + 3)
        await refusal(lim, key, m, T0 + 4)  # counted again
        assert lim.fail_open_total == 1
    finally:
        await lim.close()
        server.close()


async def test_charge_keeps_the_slot_and_names_the_token_windows_now_over(limiter: Limiter) -> None:
    """A realtime session is charged as usage is reported: its concurrency slot stays held, and
    charge says which token windows the charge took over their limit."""
    key, m = api_key(tpm=100, concurrency=1), model()
    slot = await limiter.admit(key, m, T0)
    assert await limiter.charge(slot, 60, T0 + 1) == []
    await refusal(limiter, key, m, T0 + 2)  # the concurrency slot is still held
    over = await limiter.charge(slot, 50, T0 + 3)
    assert [(x.scope, x.field) for x in over] == [("key", "tpm")]
    await limiter.settle(slot, None, T0 + 4)  # gives back the slot; the tokens stay charged
    assert (await refusal(limiter, key, m, T0 + 5)).code == "rate_limit_exceeded"
    assert isinstance(await limiter.admit(key, m, T0 + 60), Slot)  # the next minute


async def test_charge_without_token_limits_or_slot_is_nothing(limiter: Limiter) -> None:
    assert await limiter.charge(None, 10, T0) == []
    slot = await limiter.admit(api_key(concurrency=2), model(), T0)
    assert await limiter.charge(slot, 10, T0) == []
    await limiter.settle(slot, None, T0)


async def test_key_and_model_admitted_apart(limiter: Limiter) -> None:
    """A transcription session is admitted on its key first, on its model once it names one."""
    key, m = api_key(rpm=1), model(concurrency=1)
    assert isinstance(await limiter.admit_key(key, T0), Slot)
    with pytest.raises(RateLimited):
        await limiter.admit_key(key, T0 + 1)
    held = await limiter.admit_model(m, T0)
    with pytest.raises(RateLimited):
        await limiter.admit_model(m, T0)
    await limiter.settle(held, None, T0)
    assert await limiter.admit_key(api_key(), T0) is None
    assert await limiter.admit_model(model(), T0) is None


def test_needing_lowers_only_the_audio_quotas_by_the_length_and_the_claims() -> None:
    p = provider_plan("p", RateLimit(rpm=5, audio_seconds_per_hour=100, audio_seconds_per_day=1000))
    hour = next(x for x in p.limits if x.field == "audio_seconds_per_hour")
    checked = needing(p, 30.0004, {hour.key: 20.0})
    assert [x.key for x in checked.limits] == [x.key for x in p.limits]  # p's order: refusals map back by index
    assert {x.field: x.limit for x in checked.limits} == {
        "rpm": 5, "audio_seconds_per_hour": 100_000 - 50_001, "audio_seconds_per_day": 1_000_000 - 30_001}
    assert checked.charged == p.charged and checked.concurrency == p.concurrency  # settle charges the quota as set
    no_audio = provider_plan("q", RateLimit(rpm=5))
    assert needing(no_audio, 30.0, {}) is no_audio
