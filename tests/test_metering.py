"""Metering through a real gateway: characters, measured audio, cost, budgets and audio quotas,
early refusal of an over-long upload (the upstream never gets a complete request)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2 as httpx  # the openai SDK's own HTTP client
import openai
import pytest

from tests.audio_files import make
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


def test_the_sdks_do_not_retry_a_budget_spent_for_the_day(fake: FakeUpstream, make_gateway: Any) -> None:
    """Retry-After to midnight is past the 60 s the SDKs wait: they would retry at once, twice by
    default, each time refused. A window that ends within a minute is still theirs to retry."""
    key = {"display_name": "budgeted", "key_hash": hash_key("sk-budget-secret"), "allowed_models": ["*"],
           "rate_limit": {"cost_usd_per_day": 0.3, "rpm": 2}}
    gw = make_gateway(models=priced(per_request=0.4), api_keys=[key])
    sent: list[Any] = []
    with httpx.Client(event_hooks={"request": [sent.append]}) as http, \
            openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-budget-secret", http_client=http) as c:
        c.audio.speech.create(model="tts-priced", voice="alloy", input=TEXT).read()  # 0.40 of 0.30 spent
        with pytest.raises(openai.RateLimitError) as info:
            c.audio.speech.create(model="tts-priced", voice="alloy", input=TEXT)
    assert info.value.code == "budget_exceeded" and int(info.value.response.headers["Retry-After"]) > 60
    assert info.value.response.headers["x-should-retry"] == "false"
    assert len(sent) == 2  # not retried
    key["rate_limit"] = {"rpm": 1}
    gw = make_gateway(models=priced(per_request=0.4), api_keys=[key])
    with httpx.Client() as http:
        auth = {"Authorization": "Bearer sk-budget-secret"}
        body = {"model": "tts-priced", "voice": "alloy", "input": TEXT}
        assert http.post(gw.url + "/v1/audio/speech", json=body, headers=auth).status_code == 200
        r = http.post(gw.url + "/v1/audio/speech", json=body, headers=auth)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) <= 60 and "x-should-retry" not in r.headers


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


# -- uploads: measured on the wire, refused early -----------------------------------------------

def whisper(**fields: Any) -> list[dict[str, Any]]:
    return [{"display_name": "whisper-metered", "provider_key": "fake", "model_name": "whisper-1", **fields}]


async def upload(gw: Gateway, audio: bytes, order: tuple[str, str] = ("model", "file"),
                 key: str = TEAM_A) -> tuple[int, dict[str, Any], dict[str, Any]]:
    from tests.test_transcriptions import form

    data, ctype = form(*order, model=b"whisper-metered", file=audio, file_name=b"a.flac")
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/transcriptions", data=data,
                          headers={"Authorization": f"Bearer {key}", "Content-Type": ctype}) as r:
            body = await r.read()
            return r.status, json.loads(body), gw.event(r.headers["x-aisix-request-id"])


@pytest.mark.parametrize("order", [("model", "file"), ("file", "model")], ids=["model-first", "file-first"])
async def test_an_upload_is_measured_and_priced_per_minute(fake: FakeUpstream, make_gateway: Any,
                                                           order: tuple[str, str]) -> None:
    from tests.audio_files import ffprobe_seconds, make

    path = make("flac", 30.0)
    # response_format text: the upstream reports no duration, so the measured one is used
    fake.behaviour = Behaviour(transcript="hi")
    gw = make_gateway(models=whisper(pricing={"per_minute_input_audio": 0.006}))
    status, _, event = await upload(gw, path.read_bytes(), order)
    assert status == 200
    assert event["audio_seconds_in"] == pytest.approx(ffprobe_seconds(path), abs=0.05)
    assert event["cost_usd"] == pytest.approx(0.003, abs=1e-5)


@pytest.mark.parametrize("order", [("model", "file"), ("file", "model")], ids=["model-first", "file-first"])
async def test_an_upload_over_max_audio_seconds_is_refused_before_it_is_sent(
        fake: FakeUpstream, make_gateway: Any, order: tuple[str, str]) -> None:
    from tests.audio_files import make

    audio = make("flac", 61.0).read_bytes()
    gw = make_gateway(models=whisper(max_audio_seconds=60))
    status, body, event = await upload(gw, audio, order)
    assert status == 400
    assert body["error"]["code"] == "audio_too_long" and body["error"]["param"] == "file"
    assert event["error_code"] == "audio_too_long"
    # the header told the length: the file never left (model first: the form's head may have)
    assert all(audio[:4096] not in r.body for r in fake.received)
    assert all(not r.complete for r in fake.received)


async def test_an_upload_longer_than_the_quota_has_left_is_429_before_it_is_sent(
        fake: FakeUpstream, make_gateway: Any) -> None:
    from tests.audio_files import make

    key = {"display_name": "quota", "key_hash": hash_key("sk-quota-secret"), "allowed_models": ["*"],
           "rate_limit": {"audio_seconds_per_hour": 100}}
    gw = make_gateway(models=whisper(), api_keys=[key])
    status, _, event = await upload(gw, make("flac", 61.0).read_bytes(), key="sk-quota-secret")
    assert status == 200 and event["audio_seconds_in"] == pytest.approx(61.0, abs=0.05)
    received = len(fake.received)
    status, body, _ = await upload(gw, make("flac", 45.0).read_bytes(), key="sk-quota-secret")  # 39 s left
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert "Audio quota of 100 seconds per hour" in body["error"]["message"]
    assert all(not r.complete for r in fake.received[received:])
    status, _, _ = await upload(gw, make("flac", 30.0).read_bytes(), key="sk-quota-secret")
    assert status == 200  # what is left still takes a shorter one


def provider_keys(fake: FakeUpstream, quota: int) -> list[dict[str, Any]]:
    """Two provider keys on the one fake: "fake-quota" with an hourly audio quota, "fake-free" without."""
    common = {"provider": "openai", "api_base": fake.base_url, "api_key": "sk-provider-secret"}
    return [{"display_name": "fake-quota", **common, "rate_limit": {"audio_seconds_per_hour": quota}},
            {"display_name": "fake-free", **common}]


@pytest.mark.parametrize("order", [("model", "file"), ("file", "model")], ids=["model-first", "file-first"])
async def test_a_provider_keys_audio_quota_refuses_an_upload_before_it_is_sent(
        fake: FakeUpstream, make_gateway: Any, order: tuple[str, str]) -> None:
    from tests.audio_files import make

    gw = make_gateway(provider_keys=provider_keys(fake, 100),
                      models=[{"display_name": "whisper-metered", "provider_key": "fake-quota", "model_name": "w"}])
    status, _, event = await upload(gw, make("flac", 61.0).read_bytes(), order)
    assert status == 200 and event["audio_seconds_in"] == pytest.approx(61.0, abs=0.05)
    received = len(fake.received)
    status, body, event = await upload(gw, make("flac", 45.0).read_bytes(), order)  # 39 s left
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert "Audio quota of 100 seconds per hour" in body["error"]["message"]
    assert "fake-quota" not in body["error"]["message"]  # the provider key's name is the operator's business
    assert all(not r.complete for r in fake.received[received:])
    assert "attempts" not in event or all(a["status"] is None for a in event["attempts"])
    status, _, _ = await upload(gw, make("flac", 30.0).read_bytes(), order)
    assert status == 200  # what is left still takes a shorter one


async def test_a_target_whose_provider_quota_cannot_take_an_upload_is_passed_over(
        fake: FakeUpstream, make_gateway: Any) -> None:
    from tests.audio_files import make

    gw = make_gateway(provider_keys=provider_keys(fake, 100), models=[{
        "display_name": "whisper-metered", "targets": [
            {"provider_key": "fake-quota", "model_name": "w-quota"},
            {"provider_key": "fake-free", "model_name": "w-free", "priority": 1}]}])
    status, _, event = await upload(gw, make("flac", 61.0).read_bytes())
    assert status == 200 and event["provider_key"] == "fake-quota"
    status, _, event = await upload(gw, make("flac", 45.0).read_bytes())  # 39 s left on fake-quota
    assert status == 200 and event["provider_key"] == "fake-free"
    assert [(a["provider_key"], a["status"]) for a in event["attempts"]] == [("fake-free", 200)]
    assert b'name="model"\r\n\r\nw-free\r\n' in fake.received[-1].body


async def test_a_target_passed_over_for_its_audio_quota_counts_no_request_on_its_key(
        fake: FakeUpstream, make_gateway: Any) -> None:
    """Passed over, like a full window, the request counts nowhere: not in the key's rpm either."""
    from tests.audio_files import make

    keys = provider_keys(fake, 100)
    keys[0]["rate_limit"]["rpm"] = 2
    gw = make_gateway(provider_keys=keys, models=[{
        "display_name": "whisper-metered", "targets": [
            {"provider_key": "fake-quota", "model_name": "w-quota"},
            {"provider_key": "fake-free", "model_name": "w-free", "priority": 1}]}])
    status, _, event = await upload(gw, make("flac", 61.0).read_bytes())  # fake-quota: 1 request, 61 s
    assert status == 200 and event["provider_key"] == "fake-quota"
    status, _, event = await upload(gw, make("flac", 45.0).read_bytes())  # 39 s left: passed over
    assert status == 200 and event["provider_key"] == "fake-free"
    status, _, event = await upload(gw, make("flac", 30.0).read_bytes())  # fits, the 2nd request of 2
    assert status == 200 and event["provider_key"] == "fake-quota", event["attempts"]


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_target_is_passed_over_and_taken_again_as_its_provider_quota_allows(
        fake: FakeUpstream, make_gateway: Any, redis_url: str, backend: str) -> None:
    from tests.audio_files import make

    keys = provider_keys(fake, 100)
    keys[0]["display_name"] = quota = f"fake-quota-{backend}-{uuid.uuid4().hex[:8]}"  # fresh Redis counters
    gw = make_gateway({"ratelimit": {"backend": redis_url}} if backend == "redis" else None, provider_keys=keys,
                      models=[{"display_name": "whisper-metered", "targets": [
                          {"provider_key": quota, "model_name": "w-quota"},
                          {"provider_key": "fake-free", "model_name": "w-free", "priority": 1}]}])
    got = []
    for seconds in (61.0, 45.0, 30.0, 10.0):  # 61 + 30 = 91 s: then 9 s left, less than 10
        status, _, event = await upload(gw, make("flac", seconds).read_bytes())
        got.append((status, event["provider_key"]))
    assert got == [(200, quota), (200, "fake-free"), (200, quota), (200, "fake-free")]


async def test_a_failover_between_two_targets_of_one_quota_key_claims_the_upload_once(
        make_gateway: Any) -> None:
    """The first attempt's claim on the key's quota is given back before the second is admitted on
    the same key: 61 s with 100 s left fits the second target too."""
    from tests.audio_files import make

    picky = FakeUpstream()  # 503 for the first target's model name, 200 for the other
    picky.behaviour = Behaviour(status=503, status_only_for=b"w-a")
    picky.start()
    try:
        gw = make_gateway(upstream_base=picky.base_url, provider_keys=[{
            "display_name": "shared-quota", "provider": "openai", "api_base": picky.base_url,
            "api_key": "sk-provider-secret", "rate_limit": {"audio_seconds_per_hour": 100}}],
            models=[{"display_name": "whisper-metered", "targets": [
                {"provider_key": "shared-quota", "model_name": "w-a"},
                {"provider_key": "shared-quota", "model_name": "w-b", "priority": 1}]}])
        status, _, event = await upload(gw, make("flac", 61.0).read_bytes())
        assert [(a["upstream_model"], a["status"]) for a in event["attempts"]] == [("w-a", 503), ("w-b", 200)]
        assert status == 200
    finally:
        picky.stop()


async def test_a_provider_quota_found_spent_while_streaming_ends_the_upload(
        fake: FakeUpstream, make_gateway: Any) -> None:
    """An MP3 without a Xing header tells its length only as it streams: the upload is cut off
    once it is longer than the provider key's quota has left, and never reaches the upstream whole."""
    from tests.audio_files import make

    gw = make_gateway(provider_keys=provider_keys(fake, 10),
                      models=[{"display_name": "whisper-metered", "provider_key": "fake-quota", "model_name": "w"}])
    received = len(fake.received)
    status, body, event = await upload(gw, make("mp3-cbr", 60.0).read_bytes())
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert "Audio quota of 10 seconds per hour" in body["error"]["message"]
    assert event["status"] == 429
    assert all(not r.complete for r in fake.received[received:])


@pytest.mark.parametrize("order", [("model", "file"), ("file", "model")], ids=["model-first", "file-first"])
async def test_two_uploads_in_flight_cannot_both_spend_what_the_quota_has_left(
        fake: FakeUpstream, make_gateway: Any, order: tuple[str, str]) -> None:
    # Both are admitted with 100 s left and each declares 61 s in its header. Their ends are held
    # back, so both are in flight together: the one whose header is read second is refused
    # (429, before its request is complete), the other goes through once its end is sent.
    from tests.audio_files import make
    from tests.test_transcriptions import form

    key = {"display_name": "quota", "key_hash": hash_key("sk-quota-secret"), "allowed_models": ["*"],
           "rate_limit": {"audio_seconds_per_hour": 100}}
    gw = make_gateway(models=whisper(), api_keys=[key])
    # A field after both: the model part ends (is known) at the delimiter before it.
    data, ctype = form(*order, model=b"whisper-metered", file=make("flac", 61.0).read_bytes(),
                       file_name=b"a.flac", fields=[("language", b"en")])
    cut = len(data) - 5  # inside the closing delimiter: the model and the file's header are sent
    gate = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield data[:cut]
        await gate.wait()
        yield data[cut:]

    async def post(s: aiohttp.ClientSession) -> tuple[int, str]:
        async with s.post(gw.url + "/v1/audio/transcriptions", data=body(),
                          headers={"Authorization": "Bearer sk-quota-secret", "Content-Type": ctype}) as r:
            return r.status, (await r.json())["error"]["code"] if r.status != 200 else ""

    async with aiohttp.ClientSession() as s:
        calls = [asyncio.create_task(post(s)) for _ in range(2)]
        done, _ = await asyncio.wait(calls, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, "neither upload was refused while both were in flight"
        assert done.pop().result() == (429, "rate_limit_exceeded")
        gate.set()
        results = sorted(await asyncio.gather(*calls))
    assert results == [(200, ""), (429, "rate_limit_exceeded")]
    assert sum(r.complete for r in fake.received) == 1  # the refused one never reached the upstream whole


async def test_a_speech_answer_the_caller_leaves_is_charged_for_what_it_got(fake: FakeUpstream,
                                                                         make_gateway: Any) -> None:
    # A caller that read all but the end of the audio and left had no audio_seconds_out: priced by
    # the minute it cost nothing and took nothing from an audio quota. What was relayed is
    # measured (whole frames), priced and charged.
    fake.behaviour = Behaviour(speech_chunks=40, speech_chunk_bytes=4800, chunk_delay=0.05)  # 0.24 s each
    gw = make_gateway(models=priced(per_minute_output_audio=0.015))
    async with aiohttp.ClientSession() as s:
        r = await s.post(gw.url + "/v1/audio/speech", json={"model": "tts-priced", "input": TEXT, "voice": "a"},
                         headers={"Authorization": f"Bearer {TEAM_A}"})
        rid = r.headers["x-aisix-request-id"]
        got = 0
        while got < 5 * 4800:
            got += len(await r.content.readany())
        r.close()  # gone, 35 chunks before the end
    event = gw.event(rid)
    assert (event["status"], event["error_code"]) == (499, "client_closed")
    assert 1.2 <= event["audio_seconds_out"] < 40 * 0.24
    assert event["cost_usd"] == pytest.approx(event["audio_seconds_out"] / 60 * 0.015, rel=1e-3)


async def test_a_speech_answer_streamed_as_events_is_measured_and_priced_the_same(
        fake: FakeUpstream, make_gateway: Any, tmp_path: Any) -> None:
    # stream_format "sse": the audio comes base64 in speech.audio.delta events, the tokens in
    # speech.audio.done. Read as a transcript, it had no duration: priced by the minute it cost
    # nothing and took nothing from an audio quota (a way round both), and its usage was lost past
    # 1 MiB of events.
    import base64

    from tests.audio_files import close_enough, ffprobe_seconds
    from tests.fakes import SPEECH_USAGE

    fake.behaviour = Behaviour(speech_chunks=40, speech_chunk_bytes=4800)
    key = {"display_name": "sse-quota", "key_hash": hash_key("sk-sse-quota"), "allowed_models": ["*"],
           "rate_limit": {"audio_seconds_per_hour": 15}}
    gw = make_gateway(models=priced(per_minute_output_audio=0.015, per_1m_output_tokens=12.0), api_keys=[key])

    async def sse() -> tuple[int, bytes, dict[str, Any] | None]:
        async with aiohttp.ClientSession() as s, s.post(
                gw.url + "/v1/audio/speech", headers={"Authorization": "Bearer sk-sse-quota"},
                json={"model": "tts-priced", "input": TEXT, "voice": "alloy", "stream_format": "sse"}) as r:
            body = await r.read()
            return r.status, body, gw.event(r.headers["x-aisix-request-id"]) if r.status == 200 else None

    status, body, event = await sse()
    assert status == 200 and event is not None
    events = [json.loads(line[5:]) for line in body.split(b"\n") if line.startswith(b"data:")]
    assert [e["type"] for e in events] == ["speech.audio.delta"] * 40 + ["speech.audio.done"]  # relayed as sent
    out = tmp_path / "answer.mp3"
    out.write_bytes(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]))
    assert close_enough(event["audio_seconds_out"], ffprobe_seconds(out))
    assert event["stream"] is True
    assert (event["input_tokens"], event["output_tokens"]) == (SPEECH_USAGE["input_tokens"],
                                                               SPEECH_USAGE["output_tokens"])
    assert event["cost_usd"] == pytest.approx(event["audio_seconds_out"] / 60 * 0.015 + 120 * 12.0 / 1e6, rel=1e-3)
    assert event["audio_seconds_out"] > 7.5  # two of them take the 15 s quota
    assert (await sse())[0] == 200
    assert (await sse())[0] == 429


async def test_a_speech_answer_is_measured_and_priced_per_minute(fake: FakeUpstream, make_gateway: Any,
                                                                 tmp_path: Any) -> None:
    from tests.audio_files import close_enough, ffprobe_seconds

    fake.behaviour = Behaviour(speech_chunks=40, speech_chunk_bytes=4800)
    gw = make_gateway(models=priced(per_minute_output_audio=0.015))
    status, _, got = await speech(gw)
    assert status == 200
    out = tmp_path / "answer.mp3"
    out.write_bytes(got["body"])
    event = got["event"]
    assert close_enough(event["audio_seconds_out"], ffprobe_seconds(out))
    assert event["cost_usd"] == pytest.approx(event["audio_seconds_out"] / 60 * 0.015, rel=1e-3)


# -- what an operator's trial of prices, budgets and quotas found ----------------------------------

async def metrics_text(gw: Gateway) -> str:
    async with aiohttp.ClientSession() as s, s.get(gw.metrics_url + "/metrics") as r:
        return await r.text()


async def test_an_uploads_cost_is_its_price_times_the_seconds_its_event_shows(
        fake: FakeUpstream, make_gateway: Any) -> None:
    # An MP3 at 44.1 kHz lasts a whole number of 1152-sample frames: not a whole millisecond.
    # The event shows audio_seconds_in to the millisecond; the cost must be that figure times
    # the price (what an operator, or a bill, recomputes), and the metric must add up the same.
    path = make("mp3-cbr", 10.0)
    gw = make_gateway({"metrics": {"listen": "127.0.0.1:0"}},
                      models=whisper(pricing={"per_minute_input_audio": 60.0}))  # 1 USD a second
    status, _, event = await upload(gw, path.read_bytes())
    assert status == 200 and "audio_seconds" not in event  # the fake reports tokens, not seconds
    seconds = event["audio_seconds_in"]
    assert event["cost_usd"] == round(seconds * 60.0 / 60, 8), (event["cost_usd"], seconds)
    text = await metrics_text(gw)
    assert f'aisix_audio_seconds_total{{direction="in",model="whisper-metered"}} {seconds}' in text
    assert f'aisix_cost_usd_total{{model="whisper-metered"}} {event["cost_usd"]}' in text


async def test_a_speech_answers_cost_is_its_price_times_the_seconds_its_event_shows(
        fake: FakeUpstream, make_gateway: Any) -> None:
    # The fake's MP3 frames are 24 kHz 1152-sample frames (48 ms): three chunks of 4800 bytes
    # cut mid-frame, so the measured length is whole frames but priced per minute at a high price.
    gw = make_gateway(models=[{"display_name": "tts-money", "provider_key": "fake", "model_name": "tts-1",
                               "pricing": {"per_minute_output_audio": 600.0}}])
    ask = {"model": "tts-money", "input": "hi", "voice": "a"}
    async with aiohttp.ClientSession() as s, s.post(gw.url + "/v1/audio/speech", json=ask,
                                                    headers={"Authorization": f"Bearer {TEAM_A}"}) as r:
        await r.read()
        event = gw.event(r.headers["x-aisix-request-id"])
    seconds = event["audio_seconds_out"]
    assert event["cost_usd"] == round(seconds * 600.0 / 60, 8), (event["cost_usd"], seconds)


@pytest.mark.parametrize(("fmt", "seconds"), [("wav-24k-mono", 20.04), ("flac", 20.04), ("mp3-xing", 20.04)])
async def test_audio_too_long_names_a_length_over_the_limit(fake: FakeUpstream, make_gateway: Any,
                                                            fmt: str, seconds: float) -> None:
    # "The audio file is 20.0 seconds long; this model takes at most 20 seconds." refuses a file
    # with a message that says it is within the limit.
    gw = make_gateway(models=whisper(max_audio_seconds=20))
    status, body, event = await upload(gw, make(fmt, seconds).read_bytes())
    assert status == 400 and body["error"]["code"] == "audio_too_long" and body["error"]["param"] == "file"
    message = body["error"]["message"]
    said = float(re.search(r"is (?:at least )?([0-9.]+) seconds long", message)[1])  # type: ignore[index]
    assert said > 20, message
    assert event["error_code"] == "audio_too_long"


async def test_audio_too_long_on_a_length_seen_so_far_says_at_least(fake: FakeUpstream, make_gateway: Any) -> None:
    # OGG states no length: the refusal comes once the audio seen so far passes the limit, often
    # well before the file's end ("is 24.0 seconds long" for a 30 s file). The message must not
    # give that figure as the file's length.
    path = make("ogg-opus", 30.0)
    gw = make_gateway(models=whisper(max_audio_seconds=20))
    status, body, _ = await upload(gw, path.read_bytes())
    assert status == 400 and body["error"]["code"] == "audio_too_long"
    message = body["error"]["message"]
    said = float(re.search(r"is (?:at least )?([0-9.]+) seconds long", message)[1])  # type: ignore[index]
    assert said > 20 and message.startswith("The audio file is at least "), message


async def test_an_upload_the_upstream_refused_spends_no_audio_quota(fake: FakeUpstream, make_gateway: Any) -> None:
    # docs/api.md section 10 (and operations.md) said such an upload counts against the quota;
    # the gateway charges audio quotas only for work the upstream did (a 2xx), as it does costs.
    key = {"display_name": "quota-refused", "key_hash": hash_key("sk-quota-refused"), "allowed_models": ["*"],
           "rate_limit": {"audio_seconds_per_hour": 50}}
    gw = make_gateway(models=whisper(), api_keys=[key])
    fake.behaviour = Behaviour(status=400)
    status, _, event = await upload(gw, make("flac", 30.0).read_bytes(), key="sk-quota-refused")
    assert status == 400 and event["error_code"] == "upstream_error"
    assert event["audio_seconds_in"] == pytest.approx(30.0, abs=0.05)  # read to its end, measured
    fake.behaviour = Behaviour()
    status, _, _ = await upload(gw, make("flac", 45.0).read_bytes(), key="sk-quota-refused")
    assert status == 200  # the refused 30 s were not charged: 45 s fit the 50


async def test_an_upload_longer_than_the_quota_has_left_is_told_what_is_left(
        fake: FakeUpstream, make_gateway: Any) -> None:
    # The quota is not spent (61 of 100 s): a 45 s upload is refused, a 30 s one would be taken
    # now. "Audio quota of 100 seconds per hour exceeded" with a Retry-After of up to an hour
    # tells the caller to wait when a shorter file would go through at once.
    key = {"display_name": "quota-left", "key_hash": hash_key("sk-quota-left"), "allowed_models": ["*"],
           "rate_limit": {"audio_seconds_per_hour": 100}}
    gw = make_gateway(models=whisper(), api_keys=[key])
    assert (await upload(gw, make("flac", 61.0).read_bytes(), key="sk-quota-left"))[0] == 200
    status, body, _ = await upload(gw, make("flac", 45.0).read_bytes(), key="sk-quota-left")
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    message = body["error"]["message"]
    assert "Audio quota of 100 seconds per hour" in message and "exceeded" not in message, message
    assert "39.0 seconds left" in message and "45.0 seconds long" in message, message


def wav_of_samples(samples: int, rate: int = 24000) -> bytes:
    """A 16-bit mono WAV of exactly ``samples`` samples: a length a hair past a whole second."""
    import io
    import wave

    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(2 * samples))
    return out.getvalue()


async def test_audio_too_long_by_under_a_millisecond_names_a_length_over_the_limit(
        fake: FakeUpstream, make_gateway: Any) -> None:
    # 480,010 samples at 24 kHz: 20.0004 s, refused against 20 s. To the millisecond it is
    # "20.000 seconds long; this model takes at most 20 seconds": a refusal that contradicts itself.
    gw = make_gateway(models=whisper(max_audio_seconds=20))
    status, body, _ = await upload(gw, wav_of_samples(480_010))
    assert status == 400 and body["error"]["code"] == "audio_too_long"
    message = body["error"]["message"]
    said = float(re.search(r"is (?:at least )?([0-9.]+) seconds long", message)[1])  # type: ignore[index]
    assert said > 20, message


async def test_an_upload_longer_than_the_quota_has_left_by_under_a_millisecond_says_so(
        fake: FakeUpstream, make_gateway: Any) -> None:
    # 39 s left, a 39.0004 s upload (312,003 samples at 8 kHz): "39.000 seconds left, and the
    # audio file is 39.000 seconds long".
    key = {"display_name": "quota-hair", "key_hash": hash_key("sk-quota-hair"), "allowed_models": ["*"],
           "rate_limit": {"audio_seconds_per_hour": 100}}
    gw = make_gateway(models=whisper(), api_keys=[key])
    assert (await upload(gw, make("flac", 61.0).read_bytes(), key="sk-quota-hair"))[0] == 200
    status, body, _ = await upload(gw, wav_of_samples(312_003, rate=8000), key="sk-quota-hair")
    assert status == 429, body
    message = body["error"]["message"]
    left = float(re.search(r"([0-9.]+) seconds left", message)[1])  # type: ignore[index]
    long = float(re.search(r"is (?:at least )?([0-9.]+) seconds long", message)[1])  # type: ignore[index]
    assert long > left, message



@pytest.mark.parametrize(("answer", "priced"), [
    ({"usage": {"type": "duration", "seconds": -30}}, "per_minute_input_audio"),  # a credit on the bill
    ({"duration": True}, "per_minute_input_audio"),  # JSON true is no duration (Python's bool is an int)
    ({"usage": {"type": "tokens", "input_tokens": -100, "output_tokens": 5}}, "per_1m_input_tokens"),
], ids=["negative-seconds", "boolean-duration", "negative-tokens"])
async def test_a_reported_figure_that_is_no_count_is_not_taken(fake: FakeUpstream, make_gateway: Any,
                                                               answer: dict[str, Any], priced: str) -> None:
    # A 2xx whose usage said -30 seconds had cost_usd -0.003 (a credit), `"duration": true` was
    # billed as one second (not the measured 30), and -100 input tokens as a negative cost. A
    # reported figure is taken only when it is a count (a number >= 0, not a boolean), as the
    # realtime sessions' usage already is.
    fake.behaviour = Behaviour(answer_fields=answer)
    gw = make_gateway(models=whisper(pricing={priced: 6.0}))
    status, _, event = await upload(gw, make("flac", 30.0).read_bytes())
    assert status == 200
    assert "audio_seconds" not in event and event.get("input_tokens", 0) >= 0, event
    if priced == "per_minute_input_audio":  # priced by the measured 30 s
        pass
    else:  # the priced count is unknown: no cost, never a negative one
        assert "cost_usd" not in event, event


@pytest.mark.parametrize("answer", [
    {"usage": {"type": "duration", "seconds": 1e308}},
    {"duration": 1e308},
], ids=["usage-seconds", "duration"])
async def test_a_reported_figure_too_large_to_charge_does_not_keep_the_slot(
        fake: FakeUpstream, make_gateway: Any, answer: dict[str, Any]) -> None:
    # 1e308 seconds is a number >= 0, so a count: priced per minute it was an infinite cost (null
    # in the event, +Inf in aisix_cost_usd_total for good), and scaled for the key's windows
    # round() raised OverflowError in settle, after the slot was marked settled and before it was
    # given back: the key's concurrency slot was held for good, every later request a 429.
    key = {"display_name": "one-at-a-time", "key_hash": hash_key("sk-one-secret"), "allowed_models": ["*"],
           "rate_limit": {"concurrency": 1, "tpm": 1_000_000}}
    fake.behaviour = Behaviour(answer_fields=answer)
    gw = make_gateway(models=whisper(pricing={"per_minute_input_audio": 6.0}), api_keys=[key])
    audio = make("flac", 1.0).read_bytes()
    status, _, event = await upload(gw, audio, key="sk-one-secret")
    assert status == 200
    assert "cost_usd" not in event, event  # no finite cost: unknown, as an unreported figure's
    fake.behaviour = Behaviour()
    status, body, event = await upload(gw, audio, key="sk-one-secret")
    assert status == 200, body
    assert event["cost_usd"] == round(event["audio_seconds_in"] * 6.0 / 60, 8), event


class LabelledPcm:
    """Answers speech with 3 s of raw 16-bit samples at the rate and channels its label states."""

    def __init__(self, label: str, rate: int, channels: int) -> None:
        from tests.fakes import CannedUpstream

        self.upstream = CannedUpstream(label, bytes(3 * rate * channels * 2))


@pytest.mark.parametrize("label, rate, channels", [
    ("audio/L16; rate=16000", 16000, 1), ("audio/L16;rate=22050;channels=2", 22050, 2),
    ("audio/pcm; rate=44100", 44100, 1), ("audio/L16", 24000, 1), ("audio/pcm", 24000, 1)])
async def test_raw_speech_audio_is_timed_at_the_rate_its_label_states(make_gateway: Any, label: str, rate: int,
                                                                      channels: int) -> None:
    """RFC 2586's audio/L16 must state its `rate` (and may state `channels`): raw samples have no
    header, so the label is all there is. The gateway took every audio/L16 (and audio/pcm) answer
    for OpenAI's 24 kHz mono whatever its label said: 3 s at 16 kHz was measured 2 s, priced and
    charged to the audio quotas as 2 s; stereo at 22.05 kHz, 5.5 s."""
    pcm = LabelledPcm(label, rate, channels)
    try:
        gw = make_gateway(upstream_base=pcm.upstream.base_url, models=priced(per_minute_output_audio=0.015))
        status, _, got = await speech(gw)
    finally:
        pcm.upstream.stop()
    assert status == 200 and len(got["body"]) == 3 * rate * channels * 2
    assert got["event"]["audio_seconds_out"] == pytest.approx(3.0)
