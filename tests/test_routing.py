"""Several targets behind one alias: failover for speech and uploads, replay from disk, weights,
priority, provider-key limits, cooldowns (shared through a real Redis), Azure, and the SDK.

Two fake upstreams: ``fake`` (the session's, provider key "fake") and ``fake_b`` (provider key
"fake-b"). The failover aliases put ``fake`` first (priority 0) and ``fake_b`` second, so the
order of attempts is known without relying on chance.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import os
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from tests.fakes import Behaviour, FakeUpstream, SocketUpstream
from tests.gateway import PROVIDER_SECRET, TEAM_A, Gateway, fd_targets, hash_key
from tests.test_transcriptions import form

AUTH = {"Authorization": f"Bearer {TEAM_A}"}
NO_COOLDOWN = {"failures": 1000000}  # the module's gateway: every test starts with both targets healthy


def targets(a: str, b: str) -> list[dict[str, Any]]:
    return [{"provider_key": "fake", "model_name": a}, {"provider_key": "fake-b", "model_name": b, "priority": 1}]


def models(cooldown: dict[str, int] | None = None, **retry: int) -> list[dict[str, Any]]:
    common: dict[str, Any] = {"cooldown": cooldown or NO_COOLDOWN}
    if retry:
        common["retry"] = retry
    return [
        {"display_name": "tts-failover", "routes": ["speech"], "targets": targets("tts-a", "tts-b"), **common},
        # a longer model name on b: the replayed body's Content-Length must be b's own
        {"display_name": "whisper-failover", "routes": ["transcriptions", "translations"],
         "targets": targets("whisper-a", "whisper-much-longer-b"), **common},
    ]


def key_b(base: str, **fields: Any) -> dict[str, Any]:
    return {"display_name": "fake-b", "provider": "openai", "api_base": base, "api_key": PROVIDER_SECRET, **fields}


@pytest.fixture(scope="module")
def fake_b() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream()
    upstream.start()
    yield upstream
    upstream.stop()


@pytest.fixture(autouse=True)
def _fresh_b(fake_b: FakeUpstream) -> None:
    fake_b.reset()


@pytest.fixture(scope="module")
def routed(fake: FakeUpstream, fake_b: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("routed"), fake.base_url, provider_keys=[key_b(fake_b.base_url)],
                 models=models()).start()
    yield gw
    gw.stop()


async def speech(gw: Gateway, model: str = "tts-failover", **kw: Any) -> tuple[int, bytes, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/speech", json={"model": model, "input": "hi", "voice": "alloy"},
                          headers=AUTH, **kw) as r:
            body = await r.read()
            return r.status, body, gw.event(r.headers["x-aisix-request-id"])


async def upload(gw: Gateway, data: bytes | AsyncIterator[bytes], content_type: str,
                 route: str = "transcriptions") -> tuple[int, bytes, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + f"/v1/audio/{route}", data=data,
                          headers={**AUTH, "Content-Type": content_type}) as r:
            body = await r.read()
            return r.status, body, gw.event(r.headers["x-aisix-request-id"])


def spooled(gw: Gateway) -> list[str]:
    """The gateway's open temp files: unlinked files in the temp directory (O_TMPFILE)."""
    tmp = tempfile.gettempdir()
    return [t for t in fd_targets(gw.pid) if t.startswith(tmp) and t.endswith("(deleted)")]


def attempts(event: dict[str, Any]) -> list[tuple[str, int | None, str | None]]:
    return [(a["provider_key"], a["status"], a["error"]) for a in event["attempts"]]


# -- failover, speech ---------------------------------------------------------------------------

@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 401, 403])
async def test_speech_fails_over_on_these_statuses(routed: Gateway, fake: FakeUpstream, fake_b: FakeUpstream,
                                                   status: int) -> None:
    fake.behaviour = Behaviour(status=status)
    got, body, event = await speech(routed)
    assert got == 200 and len(body) == 3 * 4800
    assert json.loads(fake.wait_received()[0].body)["model"] == "tts-a"
    assert json.loads(fake_b.wait_received()[0].body)["model"] == "tts-b"
    assert attempts(event) == [("fake", status, None), ("fake-b", 200, None)]
    assert (event["provider_key"], event["upstream_model"], event["status"]) == ("fake-b", "tts-b", 200)


@pytest.mark.parametrize("status", [400, 404, 413, 422])
async def test_other_answers_are_relayed_as_they_came(routed: Gateway, fake: FakeUpstream, fake_b: FakeUpstream,
                                                      status: int) -> None:
    fake.behaviour = Behaviour(status=status)
    got, body, event = await speech(routed)
    assert got == status and json.loads(body)["error"]["code"] == "fake_error"
    assert attempts(event) == [("fake", status, None)]
    assert fake_b.received == []


@pytest.mark.parametrize("fail, error", [("reset_before", "reset"), ("garbage", "reset")])
async def test_speech_fails_over_on_a_broken_connection(routed: Gateway, fake: FakeUpstream, fake_b: FakeUpstream,
                                                        fail: str, error: str) -> None:
    fake.behaviour = Behaviour(fail=fail)
    got, _, event = await speech(routed)
    assert got == 200
    assert attempts(event) == [("fake", None, error), ("fake-b", 200, None)]


async def test_no_failover_once_the_caller_has_the_answer(routed: Gateway, fake: FakeUpstream,
                                                          fake_b: FakeUpstream) -> None:
    fake.behaviour = Behaviour(fail="reset_mid")
    with pytest.raises(aiohttp.ClientPayloadError):
        await speech(routed)
    assert fake_b.received == []


async def test_when_every_target_fails_the_last_answer_is_relayed(routed: Gateway, fake: FakeUpstream,
                                                                   fake_b: FakeUpstream) -> None:
    fake.behaviour = Behaviour(status=503)
    fake_b.behaviour = Behaviour(status=429)
    got, body, event = await speech(routed)
    assert got == 429 and json.loads(body)["error"]["message"] == "fake upstream error 429"
    assert attempts(event) == [("fake", 503, None), ("fake-b", 429, None)]
    assert event["error_code"] == "upstream_error"


# OpenAI's own 401 names the last characters of the key it refused.
REFUSED_KEY = "Incorrect API key provided: sk-proj-****************wxyz. You can find your API key at ..."


async def test_a_provider_refusing_the_gateways_key_is_a_502_without_its_body(
        routed: Gateway, fake: FakeUpstream, fake_b: FakeUpstream, make_gateway: Any) -> None:
    # Relayed as it came, the 401 gave a caller part of the operator's provider key, and told the
    # SDKs the caller's own key was wrong. With several targets it is failed over first.
    fake.behaviour = fake_b.behaviour = Behaviour(status=401, error_message=REFUSED_KEY)
    for gw in (make_gateway(), routed):
        for _ in range(2):
            async with aiohttp.ClientSession() as s, s.post(
                    gw.url + "/v1/audio/speech", json={"model": "tts-failover" if gw is routed else "tts-prod",
                                                       "input": "hi", "voice": "alloy"}, headers=AUTH) as r:
                body = await r.read()
                assert (r.status, r.headers["x-should-retry"]) == (502, "false")
                event = gw.event(r.headers["x-aisix-request-id"])
            assert json.loads(body)["error"] == {
                "message": "The upstream provider refused the gateway's credentials for this model.",
                "type": "upstream_error", "param": None, "code": "upstream_auth_failed"}
            assert (event["status"], event["error_code"]) == (502, "upstream_auth_failed")
        assert [a[1] for a in attempts(event)] == ([401] if gw is not routed else [401, 401])
        gw.wait_log("the upstream refused provider key 'fake'")  # stderr is written by a thread
        if gw is routed:
            gw.wait_log("the upstream refused provider key 'fake-b'")
        assert b"wxyz" not in body and "wxyz" not in gw.log()
        warned = [line for line in gw.log().splitlines() if "the upstream refused provider key" in line]
        if gw is not routed:  # a fresh process: once a minute a key
            assert len(warned) == 1 and "'fake'" in warned[0]
        else:  # the failed-over key too (the module's gateway may have warned before)
            assert any("'fake'" in w for w in warned) and any("'fake-b'" in w for w in warned)


async def test_an_earlier_answer_beats_a_later_failure_without_one(fake: FakeUpstream, make_gateway: Any) -> None:
    """The caller gets the last upstream answer as it came, even when a later attempt got none."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    gw = make_gateway(provider_keys=[key_b(dead)], models=models())
    fake.behaviour = Behaviour(status=500)
    got, body, event = await speech(gw)
    assert got == 500 and json.loads(body)["error"]["message"] == "fake upstream error 500"
    assert attempts(event) == [("fake", 500, None), ("fake-b", None, "connect")]
    assert (event["provider_key"], event["upstream_model"]) == ("fake", "tts-a")  # whose answer it is
    # with no answer at all, the gateway's own 502
    gw2 = make_gateway(upstream_base=dead, provider_keys=[key_b(dead)], models=models())
    got, body, event = await speech(gw2)
    assert got == 502 and json.loads(body)["error"]["code"] == "upstream_unavailable"
    assert attempts(event) == [("fake", None, "connect"), ("fake-b", None, "connect")]


async def test_connect_failure_fails_over(fake: FakeUpstream, fake_b: FakeUpstream, make_gateway: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    gw = make_gateway(upstream_base=dead, provider_keys=[key_b(fake_b.base_url)], models=models())
    got, _, event = await speech(gw)
    assert got == 200
    assert attempts(event) == [("fake", None, "connect"), ("fake-b", 200, None)]


async def test_a_silent_target_times_out_and_fails_over(fake: FakeUpstream, fake_b: FakeUpstream,
                                                        make_gateway: Any) -> None:
    gw = make_gateway({"upstream": {"timeout_ms": 300}}, provider_keys=[key_b(fake_b.base_url)], models=models())
    fake.behaviour = Behaviour(fail="stall_headers")
    got, _, event = await speech(gw)
    assert got == 200
    assert attempts(event) == [("fake", None, "timeout"), ("fake-b", 200, None)]
    assert event["attempts"][0]["ms"] >= 250  # the attempt waited out its timeout (ms are floored)


async def test_max_attempts_one_never_fails_over(fake: FakeUpstream, fake_b: FakeUpstream, make_gateway: Any) -> None:
    gw = make_gateway(provider_keys=[key_b(fake_b.base_url)], models=models(max_attempts=1))
    fake.behaviour = Behaviour(status=503)
    got, _, event = await speech(gw)
    assert got == 503 and attempts(event) == [("fake", 503, None)]
    assert fake_b.received == []


# -- failover, uploads --------------------------------------------------------------------------

async def in_pieces(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.parametrize("route", ["transcriptions", "translations"])
@pytest.mark.parametrize("order", [("model", "file"), ("file", "model")], ids=["model-first", "file-first"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_upload_is_replayed_byte_for_byte(routed: Gateway, fake: FakeUpstream, fake_b: FakeUpstream,
                                                   route: str, order: tuple[str, str], framing: str) -> None:
    audio = os.urandom(300_000)
    data, ctype = form(*order, model=b"whisper-failover", file=audio, fields=[("prompt", b"a prompt")])
    # a reads part of the body, then answers 503 while the caller is still sending
    fake.behaviour = Behaviour(status=503, read_bytes=100_000)
    got, body, event = await upload(routed, data if framing == "content-length" else in_pieces(data), ctype, route)
    assert got == 200, body
    expected = data.replace(b"whisper-failover", b"whisper-much-longer-b")
    received = fake_b.wait_received()[0]
    assert received.body == expected and received.complete
    if framing == "content-length":
        assert received.headers["Content-Length"] == str(len(expected))
    assert attempts(event) == [("fake", 503, None), ("fake-b", 200, None)]


async def test_a_200_mib_upload_replays_from_disk(fake: FakeUpstream, fake_b: FakeUpstream, make_gateway: Any) -> None:
    """The first target reads part of it then resets: the second gets every byte, memory stays
    flat, and no temp file is left."""
    gw = make_gateway(provider_keys=[key_b(fake_b.base_url)], models=models())
    size = 200 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    boundary = b"----aisixBigBoundary"
    head = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-failover\r\n--'
            + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n')
    tail = b"\r\n--" + boundary + b"--\r\n"
    expected = hashlib.sha256(head.replace(b"whisper-failover", b"whisper-much-longer-b"))
    for _ in range(size // len(block)):
        expected.update(block)
    expected.update(tail)

    async def body() -> AsyncIterator[bytes]:
        yield head
        for _ in range(size // len(block)):
            yield block
        yield tail

    fake.behaviour = Behaviour(status=503, read_bytes=30 * 1024 * 1024, keep_body=False)
    fake_b.behaviour = Behaviour(keep_body=False)
    before = gw.rss_kib()
    gw.reset_peak()
    got, _, event = await upload(gw, body(), "multipart/form-data; boundary=" + boundary.decode())
    assert got == 200
    received = fake_b.wait_received()[0]
    assert (received.size, received.sha256) == (len(head) + 5 + size + len(tail), expected.hexdigest())
    assert attempts(event) == [("fake", 503, None), ("fake-b", 200, None)]
    assert gw.peak_rss_kib() - before < 64 * 1024
    assert not spooled(gw)


async def test_past_the_replay_limit_an_upload_is_not_retried(fake: FakeUpstream, fake_b: FakeUpstream,
                                                             make_gateway: Any) -> None:
    gw = make_gateway(provider_keys=[key_b(fake_b.base_url)], models=models(replay_limit_bytes=100_000))
    data, ctype = form("model", "file", model=b"whisper-failover", file=os.urandom(1_000_000))
    fake.behaviour = Behaviour(status=503, read_bytes=500_000)
    got, body, event = await upload(gw, data, ctype)
    assert got == 503 and json.loads(body)["error"]["code"] == "fake_error"
    assert attempts(event) == [("fake", 503, None)]
    assert fake_b.received == []
    # under the limit, the same alias fails over
    small, ctype = form("model", "file", model=b"whisper-failover", file=b"RIFF" + bytes(20_000))
    fake.behaviour = Behaviour(status=503)
    got, _, event = await upload(gw, small, ctype)
    assert got == 200 and attempts(event) == [("fake", 503, None), ("fake-b", 200, None)]


async def test_a_bad_upload_is_the_callers_fault_not_the_targets(routed: Gateway, fake: FakeUpstream,
                                                                 fake_b: FakeUpstream) -> None:
    data, ctype = form("model", "file", model=b"whisper-failover")
    got, body, event = await upload(routed, data[:-10] + b"garbage!!!", ctype)  # no closing delimiter
    assert got == 400 and json.loads(body)["error"]["code"] == "invalid_multipart"
    assert fake_b.received == [] and len(event["attempts"]) == 1


# -- choice -------------------------------------------------------------------------------------

async def test_weights_share_the_traffic(fake: FakeUpstream, fake_b: FakeUpstream, make_gateway: Any) -> None:
    weighted = [{"display_name": "tts-weighted", "targets": [
        {"provider_key": "fake", "model_name": "tts-a", "weight": 3},
        {"provider_key": "fake-b", "model_name": "tts-b", "weight": 1}]}]
    gw = make_gateway(provider_keys=[key_b(fake_b.base_url)], models=weighted)
    n = 240
    fake.behaviour = fake_b.behaviour = Behaviour(speech_chunks=1, speech_chunk_bytes=48)
    for _ in range(n):
        got, _, _ = await speech(gw, "tts-weighted")
        assert got == 200
    a, b = len(fake.received), len(fake_b.received)
    assert a + b == n
    assert 0.62 < a / n < 0.88, (a, b)  # 0.75 expected; the bounds are > 4 standard deviations out


async def test_a_provider_keys_own_limit_steers_traffic(fake: FakeUpstream, fake_b: FakeUpstream,
                                                        make_gateway: Any) -> None:
    limited = {"display_name": "fake-limited", "provider": "openai", "api_base": fake.base_url,
               "api_key": PROVIDER_SECRET, "rate_limit": {"rpd": 2}}
    steered = [{"display_name": "tts-steered", "targets": [
        {"provider_key": "fake-limited", "model_name": "tts-a"},
        {"provider_key": "fake-b", "model_name": "tts-b", "priority": 1}]}]
    gw = make_gateway(provider_keys=[limited, key_b(fake_b.base_url)], models=steered)
    keys = [(await speech(gw, "tts-steered"))[2]["provider_key"] for _ in range(4)]
    assert keys == ["fake-limited", "fake-limited", "fake-b", "fake-b"]


async def test_every_provider_key_full_is_429(fake: FakeUpstream, make_gateway: Any) -> None:
    limited = {"display_name": "fake-limited", "provider": "openai", "api_base": fake.base_url,
               "api_key": PROVIDER_SECRET, "rate_limit": {"rpd": 1}}
    gw = make_gateway(provider_keys=[limited], models=[
        {"display_name": "tts-one", "provider_key": "fake-limited", "model_name": "tts-a"}])
    assert (await speech(gw, "tts-one"))[0] == 200
    got, body, event = await speech(gw, "tts-one")
    error = json.loads(body)["error"]
    assert (got, error["code"]) == (429, "rate_limit_exceeded")
    assert "fake-limited" not in error["message"]  # the provider key's name is the operator's business
    assert "attempts" not in event


async def test_a_request_refused_by_every_provider_key_still_counts_for_its_caller(
        fake: FakeUpstream, make_gateway: Any) -> None:
    # Admitted on its key's limits, it counts there whatever becomes of it (docs/api.md, section 8;
    # OpenAI counts unsuccessful requests too): a caller resending at once is not served faster.
    limited = {"display_name": "fake-limited", "provider": "openai", "api_base": fake.base_url,
               "api_key": PROVIDER_SECRET, "rate_limit": {"rpd": 1}}
    caller = {"display_name": "three-a-minute", "key_hash": hash_key("sk-three"), "allowed_models": ["*"],
              "rate_limit": {"rpm": 3}}
    gw = make_gateway(provider_keys=[limited], api_keys=[caller], models=[
        {"display_name": "tts-one", "provider_key": "fake-limited", "model_name": "tts-a"},
        {"display_name": "tts-free", "provider_key": "fake", "model_name": "tts-b"}])
    got = []
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer sk-three"}) as s:
        for model in ("tts-one", "tts-one", "tts-one", "tts-free"):
            async with s.post(gw.url + "/v1/audio/speech", json={"model": model, "input": "hi", "voice": "a"}) as r:
                got.append((r.status, (await r.json())["error"]["message"] if r.status != 200 else ""))
    assert [status for status, _ in got] == [200, 429, 429, 429]
    assert "upstream provider" in got[1][1] and "this API key" in got[3][1]


# -- cooldown -----------------------------------------------------------------------------------

async def test_a_failing_target_cools_down(fake: FakeUpstream, fake_b: FakeUpstream, make_gateway: Any) -> None:
    gw = make_gateway({"metrics": {"listen": "127.0.0.1:0"}}, provider_keys=[key_b(fake_b.base_url)],
                      models=models({"failures": 2, "window_s": 60, "cooldown_s": 600}))
    fake.behaviour = Behaviour(status=503)
    for _ in range(2):
        assert attempts((await speech(gw))[2]) == [("fake", 503, None), ("fake-b", 200, None)]
    # cooling down: b first, a not asked at all
    assert attempts((await speech(gw))[2]) == [("fake-b", 200, None)]
    assert len(fake.received) == 2
    # b fails too and cools down after a did; a, tried anyway, answers (its cooldown is not pushed back)
    fake.behaviour, fake_b.behaviour = Behaviour(), Behaviour(status=503)
    for _ in range(2):
        assert attempts((await speech(gw))[2]) == [("fake-b", 503, None), ("fake", 200, None)]
    # every target cooling down: the one whose cooldown ends first (a's) is still tried first
    assert attempts((await speech(gw))[2]) == [("fake", 200, None)]
    async with aiohttp.ClientSession() as s, s.get(gw.metrics_url + "/metrics") as r:
        text = await r.text()
    assert 'aisix_target_cooling_down{model="tts-failover",provider_key="fake"} 1.0' in text
    assert 'aisix_upstream_attempts_total{model="tts-failover",outcome="503",provider_key="fake"}' in text


async def test_cooldowns_are_shared_through_redis(fake: FakeUpstream, fake_b: FakeUpstream, make_gateway: Any,
                                                  redis_url: str) -> None:
    settings = {"ratelimit": {"backend": redis_url}}
    cooling = models({"failures": 1, "window_s": 60, "cooldown_s": 600})
    one = make_gateway(settings, provider_keys=[key_b(fake_b.base_url)], models=cooling)
    two = make_gateway(settings, provider_keys=[key_b(fake_b.base_url)], models=cooling)
    fake.behaviour = Behaviour(status=503)
    assert attempts((await speech(one))[2]) == [("fake", 503, None), ("fake-b", 200, None)]
    assert attempts((await speech(two))[2]) == [("fake-b", 200, None)]  # learnt from the first


# -- Azure --------------------------------------------------------------------------------------

@pytest.mark.parametrize("version, path, query", [
    ("2024-10-21", "/openai/deployments/whisper-east/audio/transcriptions", "api-version=2024-10-21"),
    ("v1", "/openai/v1/audio/transcriptions", ""),
])
async def test_azure_urls_and_headers(fake: FakeUpstream, make_gateway: Any, version: str, path: str,
                                      query: str) -> None:
    base = fake.base_url.removesuffix("/v1")
    azure = {"display_name": "azure-east", "provider": "azure", "api_base": base, "api_key": "azure-secret-key",
             "api_version": version}
    gw = make_gateway(provider_keys=[azure], models=[
        {"display_name": "whisper-azure", "provider_key": "azure-east", "model_name": "whisper-east"}])
    data, ctype = form("file", "model", model=b"whisper-azure")
    got, _, _ = await upload(gw, data, ctype)
    assert got == 200
    received = fake.wait_received()[0]
    assert (received.path, received.query) == (path, query)
    assert received.headers["api-key"] == "azure-secret-key" and "Authorization" not in received.headers
    assert b'name="model"\r\n\r\nwhisper-east\r\n' in received.body  # the deployment name


# -- the SDK, and what is left behind -----------------------------------------------------------

def test_the_openai_sdk_through_a_failover_alias(routed: Gateway, fake: FakeUpstream, fake_b: FakeUpstream,
                                                 tmp_path: Path) -> None:
    fake.behaviour = Behaviour(status=503)
    with openai.OpenAI(base_url=routed.url + "/v1", api_key=TEAM_A, max_retries=0, timeout=30) as client:
        text = client.audio.transcriptions.create(model="whisper-failover",
                                                  file=("a.wav", b"RIFF" + bytes(50_000), "audio/wav")).text
        assert text == "hello from the fake"
        out = tmp_path / "a.mp3"
        with client.audio.speech.with_streaming_response.create(model="tts-failover", voice="alloy",
                                                                input="hi") as r:
            r.stream_to_file(out)
        assert out.stat().st_size == 3 * 4800
    assert len(fake_b.received) == 2


def test_no_temp_file_is_left(routed: Gateway) -> None:
    """After every test of this module on the shared gateway: nothing spooled is still open."""
    assert not spooled(routed)


async def test_the_access_line_names_the_attempts(routed: Gateway, fake: FakeUpstream) -> None:
    fake.behaviour = Behaviour(status=502)
    _, _, event = await speech(routed)
    line = routed.wait_log(f"rid={event['request_id']}")
    assert line.rstrip().endswith("attempts=fake:502,fake-b:200"), line


async def test_a_reload_keeps_cooldowns(fake: FakeUpstream, fake_b: FakeUpstream, make_gateway: Any) -> None:
    """Cooldowns are kept by alias and target, so a reload that keeps the target keeps its state."""
    gw = make_gateway(provider_keys=[key_b(fake_b.base_url)],
                      models=models({"failures": 1, "window_s": 60, "cooldown_s": 600}))
    fake.behaviour = Behaviour(status=503)
    assert attempts((await speech(gw))[2]) == [("fake", 503, None), ("fake-b", 200, None)]
    gw.signal(signal.SIGHUP)
    gw.wait_log("reloaded")
    assert attempts((await speech(gw))[2]) == [("fake-b", 200, None)]


def reload_without_fake(gw: Gateway) -> dict[str, Any]:
    """Reload tts-failover with target "fake" taken out (another on fake-b instead); the file."""
    path = gw.dir / "resources.yaml"
    doc = yaml.safe_load(path.read_text())
    alias = next(m for m in doc["models"] if m["display_name"] == "tts-failover")
    alias["targets"] = [t for t in alias["targets"] if t["provider_key"] != "fake"] + [
        {"provider_key": "fake-b", "model_name": "tts-c"}]
    path.write_text(yaml.safe_dump(doc))
    gw.signal(signal.SIGHUP)
    gw.wait_log("reloaded")
    return doc


async def test_a_reload_drops_the_cooling_series_of_a_removed_target(fake: FakeUpstream, fake_b: FakeUpstream,
                                                                    make_gateway: Any) -> None:
    """A target taken out of an alias while it cooled down must not read (and alert) as cooling down for good."""
    gw = make_gateway({"metrics": {"listen": "127.0.0.1:0"}}, provider_keys=[key_b(fake_b.base_url)],
                      models=models({"failures": 1, "window_s": 60, "cooldown_s": 600}))

    async def cooling() -> set[str]:
        async with aiohttp.ClientSession() as s, s.get(gw.metrics_url + "/metrics") as r:
            text = await r.text()
        return {line for line in text.splitlines() if line.startswith("aisix_target_cooling_down{")}

    fake.behaviour = Behaviour(status=503)
    assert attempts((await speech(gw))[2]) == [("fake", 503, None), ("fake-b", 200, None)]
    assert await cooling() == {'aisix_target_cooling_down{model="tts-failover",provider_key="fake"} 1.0',
                               'aisix_target_cooling_down{model="tts-failover",provider_key="fake-b"} 0.0'}
    doc = reload_without_fake(gw)
    assert await cooling() == {'aisix_target_cooling_down{model="tts-failover",provider_key="fake-b"} 0.0'}
    doc["models"] = [m for m in doc["models"] if m["display_name"] != "tts-failover"]  # the alias itself goes
    path = gw.dir / "resources.yaml"
    path.write_text(yaml.safe_dump(doc))
    gw.signal(signal.SIGHUP)
    gw.wait_log(f"{path}: {len(doc['models'])} models")  # this reload's line, not the first's
    assert await cooling() == set()


async def test_a_request_from_before_a_reload_does_not_bring_a_dropped_series_back(
        fake: FakeUpstream, fake_b: FakeUpstream, make_gateway: Any) -> None:
    """A request keeps the aliases it arrived with; its attempts after the reload must not set the
    series of a target the reload took out (nothing would ever drop it again)."""
    gw = make_gateway({"metrics": {"listen": "127.0.0.1:0"}}, provider_keys=[key_b(fake_b.base_url)],
                      models=models({"failures": 1, "window_s": 60, "cooldown_s": 600}))

    async def metrics() -> list[str]:
        async with aiohttp.ClientSession() as s, s.get(gw.metrics_url + "/metrics") as r:
            return (await r.text()).splitlines()

    gone = 'aisix_target_cooling_down{model="tts-failover",provider_key="fake"} 1.0'
    fake.behaviour = Behaviour(status=503)
    assert attempts((await speech(gw))[2]) == [("fake", 503, None), ("fake-b", 200, None)]
    assert gone in await metrics()
    body = json.dumps({"model": "tts-failover", "input": "hi", "voice": "alloy"}).encode()
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEAM_A}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                 .encode() + body[:10])
    await writer.drain()
    deadline = time.monotonic() + 10
    while 'aisix_in_flight_requests{route="speech"} 1.0' not in await metrics():  # it has its snapshot
        assert time.monotonic() < deadline, "the request never reached the gateway"
    reload_without_fake(gw)
    assert gone not in await metrics()
    writer.write(body[10:])  # its alias still has the old targets, "fake" cooling down among them
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert (await speech(gw))[0] == 200
    assert gone not in await metrics()


async def test_a_caller_leaving_mid_upload_leaves_nothing_open(routed: Gateway, fake: FakeUpstream,
                                                               fake_b: FakeUpstream) -> None:
    data, ctype = form("model", "file", model=b"whisper-failover", file=os.urandom(2_000_000))
    fake.behaviour = Behaviour(status=503, read_bytes=200_000)
    host, port = routed.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEAM_A}\r\n"
                  f"x-aisix-request-id: caller-leaves-1\r\nContent-Type: {ctype}\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data[:1_000_000])
        fake.wait_received(1)  # the first target read its part and answers 503: a failover is under way
    event = routed.event("caller-leaves-1")  # written once the exchange let go of everything
    # whether the gateway saw the 503 before it saw the caller go is a race; either way:
    assert event["status"] == 499 and event["attempts"][0]["provider_key"] == "fake"
    left = spooled(routed)
    assert not left, (left, routed.log()[-3000:])


async def test_cooldowns_steer_even_without_retries(fake: FakeUpstream, fake_b: FakeUpstream,
                                                    make_gateway: Any) -> None:
    gw = make_gateway(provider_keys=[key_b(fake_b.base_url)],
                      models=models({"failures": 1, "window_s": 60, "cooldown_s": 600}, max_attempts=1))
    fake.behaviour = Behaviour(status=503)
    assert attempts((await speech(gw))[2]) == [("fake", 503, None)]  # no retry: the 503 as it came
    assert attempts((await speech(gw))[2]) == [("fake-b", 200, None)]  # but the next goes elsewhere


async def test_a_provider_keys_budget_steers_traffic(fake: FakeUpstream, fake_b: FakeUpstream,
                                                     make_gateway: Any) -> None:
    budgeted = {"display_name": "fake-budget", "provider": "openai", "api_base": fake.base_url,
                "api_key": PROVIDER_SECRET, "rate_limit": {"cost_usd_per_day": 1.0}}
    steered = [{"display_name": "tts-budget", "pricing": {"per_request": 0.6}, "targets": [
        {"provider_key": "fake-budget", "model_name": "tts-a"},
        {"provider_key": "fake-b", "model_name": "tts-b", "priority": 1}]}]
    gw = make_gateway(provider_keys=[budgeted, key_b(fake_b.base_url)], models=steered)
    keys = [(await speech(gw, "tts-budget"))[2]["provider_key"] for _ in range(3)]
    assert keys == ["fake-budget", "fake-budget", "fake-b"]  # 1.20 spent on that key after two


# -- what an operator's trial of a two-provider alias found -----------------------------------------


class LargeErrorUpstream(SocketUpstream):
    """Answers every request with a 503 whose JSON body is larger than the 64 KiB a failed
    answer may be kept in (failover.BUFFER_LIMIT): the gateway drops it, "as if that attempt had
    got no answer"."""

    BODY = json.dumps({"error": {"message": "overloaded " + "x" * 100_000, "type": "server_error",
                                 "param": None, "code": "overloaded"}}).encode()

    def _serve(self, conn: socket.socket, number: int) -> None:
        try:
            conn.settimeout(30)
            f = conn.makefile("rb")
            f.readline()
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            f.read(length)
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(self.BODY) + self.BODY)
            conn.recv(1)  # until the gateway closes it
        except OSError:
            pass
        finally:
            conn.close()


async def test_a_dropped_large_answer_then_a_full_provider_key_is_not_an_internal_error(
        fake: FakeUpstream, make_gateway: Any) -> None:
    """The first target answers 503 with more than 64 KiB (dropped, as if no answer came); the
    second target's provider key is at its own limit, so it is skipped. The caller must get the
    envelope of that failure (502 upstream_unavailable), not 500 internal_error from a gateway
    assertion, and the log must not say "unhandled error"."""
    big = LargeErrorUpstream()
    try:
        keys = [{"display_name": "big", "provider": "openai", "api_base": big.base_url, "api_key": PROVIDER_SECRET},
                {"display_name": "limited", "provider": "openai", "api_base": fake.base_url,
                 "api_key": PROVIDER_SECRET, "rate_limit": {"rpd": 1}}]
        models = [
            {"display_name": "tts-limited-only", "provider_key": "limited", "model_name": "tts-b"},
            {"display_name": "tts-pair", "routes": ["speech"], "targets": [
                {"provider_key": "big", "model_name": "tts-a"},
                {"provider_key": "limited", "model_name": "tts-b", "priority": 1}]},
        ]
        gw = make_gateway(provider_keys=keys, models=models)
        status, _, _ = await speech(gw, "tts-limited-only")  # takes the limited key's one request today
        assert status == 200
        status, body, event = await speech(gw, "tts-pair")
        assert status == 502, (status, body)
        assert json.loads(body)["error"]["code"] == "upstream_unavailable"
        assert [(a["provider_key"], a["status"]) for a in event["attempts"]] == [("big", 503)]
        assert "unhandled error" not in gw.log()
    finally:
        big.stop()


async def test_the_ttfb_of_a_kept_answer_is_its_own_attempts(fake: FakeUpstream, fake_b: FakeUpstream,
                                                              make_gateway: Any) -> None:
    """The first target answers 503 at once; the second says nothing and times out (300 ms); the
    caller gets the first answer. Its upstream_ttfb_ms (and the aisix_upstream_ttfb_seconds
    observation) is the time that upstream took to answer, not the later attempt's timeout."""
    gw = make_gateway(provider_keys=[key_b(fake_b.base_url)], models=[
        {"display_name": "tts-pair", "routes": ["speech"], "timeout": 300, "cooldown": {"failures": 1000000},
         "targets": [{"provider_key": "fake", "model_name": "tts-a"},
                     {"provider_key": "fake-b", "model_name": "tts-b", "priority": 1}]}])
    fake.behaviour = Behaviour(status=503)
    fake_b.behaviour = Behaviour(fail="stall_headers")
    status, body, event = await speech(gw, "tts-pair")
    assert status == 503 and json.loads(body)["error"]["code"] == "fake_error"
    assert attempts(event) == [("fake", 503, None), ("fake-b", None, "timeout")]
    assert event["attempts"][1]["ms"] >= 250
    assert event["upstream_ttfb_ms"] <= event["attempts"][0]["ms"] + 50, event


async def test_a_speech_request_is_timed_from_its_last_byte_not_from_before_the_connect(
        fake: FakeUpstream, make_gateway: Any) -> None:
    """A target whose listener takes no more connections (its accept queue full: the kernel drops
    the SYN) is a connect failure, held to connect_timeout_ms, as for an upload. Speech called
    `sent` before the connection was had: the alias's `timeout` (shorter here) ran during the
    connect and recorded it as `timeout`, and a connect that did succeed counted in the ttfb."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    queued = socket.create_connection(full.getsockname())  # fills the queue: nobody accepts
    try:
        keys = [{"display_name": "full", "provider": "openai", "api_key": PROVIDER_SECRET,
                 "api_base": f"http://127.0.0.1:{full.getsockname()[1]}/v1"}]
        models = [{"display_name": "tts-full", "routes": ["speech"], "timeout": 200, "targets": [
            {"provider_key": "full", "model_name": "tts-a"}, {"provider_key": "fake", "model_name": "tts-b",
                                                              "priority": 1}]}]
        gw = make_gateway({"upstream": {"connect_timeout_ms": 1000}}, provider_keys=keys, models=models)
        status, _, event = await speech(gw, "tts-full")
        assert status == 200
        assert attempts(event) == [("full", None, "connect"), ("fake", 200, None)]
        assert event["attempts"][0]["ms"] >= 900
        assert event["upstream_ttfb_ms"] <= event["attempts"][1]["ms"]
    finally:
        queued.close()
        full.close()


class EarlyAnswer(SocketUpstream):
    """Reads 100 KB of the upload, sends the head of a 503 and the start of its body, then reads
    the rest of the upload without ever finishing that answer."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[int] = []  # body bytes read per request
        self.answered = threading.Event()  # the 503's head has been sent

    def _serve(self, conn: socket.socket, number: int) -> None:
        try:
            conn.settimeout(30)
            f = conn.makefile("rb")
            while f.readline() not in (b"\r\n", b""):
                pass
            n = len(f.read(100_000))
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 80\r\n\r\n{\"error\": {")
            self.answered.set()
            while data := conn.recv(65536):
                n += len(data)
        except OSError:
            pass
        finally:
            self.read.append(n)
            conn.close()


async def test_an_upload_that_fails_while_a_503_is_read_ends_the_request(fake_b: FakeUpstream,
                                                                          make_gateway: Any) -> None:
    """The first target answers 503 before the upload has ended, and the caller's upload then turns
    out broken: the request ends with the caller's own 400, as it would have without the 503. No
    other target is tried, nor sent a part of a request that already failed."""
    early = EarlyAnswer()
    try:
        keys = [{"display_name": "early", "provider": "openai", "api_base": early.base_url, "api_key": PROVIDER_SECRET},
                key_b(fake_b.base_url)]
        alias = {"display_name": "whisper-failover", "routes": ["transcriptions"], "cooldown": NO_COOLDOWN,
                 "targets": [{"provider_key": "early", "model_name": "whisper-a"},
                             {"provider_key": "fake-b", "model_name": "whisper-b", "priority": 1}]}
        gw = make_gateway({"upstream": {"stream_idle_timeout_ms": 5000}}, provider_keys=keys, models=[alias])
        data, ctype = form("model", "file", model=b"whisper-failover", file=b"RIFF" + bytes(2_000_000))

        async def broken() -> AsyncIterator[bytes]:
            yield data[:1_000_000]
            assert await asyncio.to_thread(early.answered.wait, 10)
            yield data[1_000_000:-20]  # still some file, then no closing delimiter

        got, body, event = await upload(gw, broken(), ctype)
        assert got == 400, body
        assert json.loads(body)["error"]["code"] == "invalid_multipart"
        assert attempts(event) == [("early", 503, None)]
        assert fake_b.received == []
    finally:
        early.stop()
