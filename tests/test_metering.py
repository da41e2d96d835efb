"""Metering through a real gateway: characters, measured audio, cost, budgets and audio quotas,
early refusal of an over-long upload (the upstream never gets a complete request)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from tests.fakes import Behaviour, FakeUpstream
from tests.gateway import TEAM_A, Gateway, hash_key

AUTH = {"Authorization": f"Bearer {TEAM_A}"}
TEXT = "Hello, wörld! ✓"  # 15 characters, more bytes


def priced(**pricing: float) -> list[dict[str, Any]]:
    return [{"display_name": "tts-priced", "provider_key": "fake", "model_name": "tts-1", "pricing": pricing}]


async def speech(gw: Gateway, model: str = "tts-priced", key: str = TEAM_A) -> tuple[int, dict[str, Any], dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/speech", json={"model": model, "input": TEXT, "voice": "alloy"},
                          headers={"Authorization": f"Bearer {key}"}) as r:
            body = await r.read()
            return r.status, dict(r.headers), {"event": gw.event(r.headers["x-aisix-request-id"]), "body": body}


async def test_speech_is_priced_by_its_characters(fake: FakeUpstream, make_gateway: Any) -> None:
    gw = make_gateway({"metrics": {"listen": "127.0.0.1:0"}}, models=priced(per_1m_input_characters=15.0))
    status, _, got = await speech(gw)
    event = got["event"]
    assert status == 200
    assert event["input_characters"] == 15
    assert event["cost_usd"] == pytest.approx(15 * 15.0 / 1e6)
    async with aiohttp.ClientSession() as s, s.get(gw.metrics_url + "/metrics") as r:
        text = await r.text()
    assert 'aisix_cost_usd_total{model="tts-priced"} 0.000225' in text


async def test_no_cost_when_a_priced_quantity_is_unknown(fake: FakeUpstream, make_gateway: Any) -> None:
    # speech answers never report tokens: priced by tokens, the cost is unknown, never a guess
    gw = make_gateway(models=priced(per_1m_output_tokens=12.0))
    _, _, got = await speech(gw)
    assert "cost_usd" not in got["event"] and got["event"]["input_characters"] == 15


async def test_failed_requests_cost_nothing(fake: FakeUpstream, make_gateway: Any) -> None:
    gw = make_gateway(models=priced(per_request=0.5))
    fake.behaviour = Behaviour(status=500)
    status, _, got = await speech(gw)
    assert status == 500 and "cost_usd" not in got["event"]


async def test_a_budget_stops_a_key(fake: FakeUpstream, make_gateway: Any) -> None:
    key = {"display_name": "budgeted", "key_hash": hash_key("sk-budget-secret"), "allowed_models": ["*"],
           "rate_limit": {"cost_usd_per_day": 1.0}}
    gw = make_gateway(models=priced(per_request=0.4), api_keys=[key])
    got = [(await speech(gw, key="sk-budget-secret"))[:2] for _ in range(4)]
    assert [status for status, _ in got] == [200, 200, 200, 429]  # 1.20 spent after the third
    status, headers, body = await speech_raw(gw, "sk-budget-secret")
    assert status == 429 and json.loads(body)["error"]["code"] == "budget_exceeded"
    assert 0 < int(headers["Retry-After"]) <= 86400
    assert (await speech(gw))[0] == 200  # another key's budget is its own


async def speech_raw(gw: Gateway, key: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/speech", json={"model": "tts-priced", "input": TEXT, "voice": "a"},
                          headers={"Authorization": f"Bearer {key}"}) as r:
            return r.status, dict(r.headers), await r.read()


async def test_a_budget_is_shared_by_two_gateways_on_one_redis(fake: FakeUpstream, make_gateway: Any,
                                                              redis_url: str) -> None:
    key = {"display_name": "budgeted-shared", "key_hash": hash_key("sk-budget-shared"), "allowed_models": ["*"],
           "rate_limit": {"cost_usd_per_month": 1.0}}
    settings = {"ratelimit": {"backend": redis_url}}
    one = make_gateway(settings, models=priced(per_request=0.6), api_keys=[key])
    two = make_gateway(settings, models=priced(per_request=0.6), api_keys=[key])
    assert (await speech(one, key="sk-budget-shared"))[0] == 200
    assert (await speech(two, key="sk-budget-shared"))[0] == 200  # 0.60 spent: admitted, then 1.20
    status, _, body = await speech_raw(one, "sk-budget-shared")
    assert status == 429 and json.loads(body)["error"]["code"] == "budget_exceeded"
