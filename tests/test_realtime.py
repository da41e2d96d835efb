"""GET /v1/realtime through a real gateway process to a fake Realtime upstream (fake_realtime.py):
auth, models, refusals, the relay (order, bytes, close codes, backpressure), limits, guardrails,
usage events, metrics, reload and drain; and the official openai SDK's realtime client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import signal
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml

from aisix import realtime_frames as frames
from aisix.config import hash_key
from tests.fake_realtime import FakeRealtime, Script, text
from tests.gateway import PROVIDER_SECRET, Gateway

KEY = "sk-rt-secret"
NARROW = "sk-rt-narrow-secret"  # may use rt-transcribe only
AZURE_SECRET = "azure-provider-secret-42"


def resources(fake: FakeRealtime, **key_fields: Any) -> dict[str, Any]:
    other = fake.base_url.replace("127.0.0.1", "localhost")  # the same fake, as another provider
    azure_base = fake.base_url.removesuffix("/v1")
    return {
        "provider_keys": [
            {"display_name": "other", "provider": "openai", "api_base": other, "api_key": "other-secret"},
            {"display_name": "azure", "provider": "azure", "api_base": azure_base, "api_key": AZURE_SECRET,
             "api_version": "2025-04-01-preview"},
            {"display_name": "dead", "provider": "openai", "api_base": "http://127.0.0.1:9/v1", "api_key": "x"},
        ],
        "models": [
            {"display_name": "rt-voice", "provider_key": "fake", "model_name": "gpt-realtime", "routes": ["realtime"]},
            {"display_name": "rt-transcribe", "provider_key": "fake", "model_name": "gpt-4o-transcribe",
             "routes": ["realtime"]},
            {"display_name": "rt-elsewhere", "provider_key": "other", "model_name": "gpt-elsewhere",
             "routes": ["realtime"]},
            {"display_name": "rt-azure", "provider_key": "azure", "model_name": "my deployment",
             "routes": ["realtime"]},
            {"display_name": "rt-failover", "routes": ["realtime"],
             "targets": [{"provider_key": "dead", "model_name": "gpt-dead", "priority": 0},
                         {"provider_key": "fake", "model_name": "gpt-alive", "priority": 1}]},
        ],
        "api_keys": [
            {"display_name": "rt", "key_hash": hash_key(KEY), "allowed_models": ["rt-*", "whisper-prod"],
             **key_fields},
            {"display_name": "rt-narrow", "key_hash": hash_key(NARROW), "allowed_models": ["rt-transcribe"]},
        ],
        "guardrails": [
            {"name": "no-passwords", "models": ["rt-*"], "hook_point": "input", "enforcement_mode": "block",
             "kind": "keyword", "patterns": [{"kind": "literal", "value": "password"}]},
            {"name": "watch-sauce", "models": ["rt-*"], "hook_point": "output", "enforcement_mode": "block",
             "kind": "keyword", "patterns": [{"kind": "literal", "value": "secret sauce"}]},
        ],
    }


@pytest.fixture(autouse=True)
def _fresh(rt: FakeRealtime) -> None:
    rt.reset()


@pytest.fixture(scope="module")
def gw(rt: FakeRealtime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("rt"), rt.base_url, {"metrics": {"listen": "127.0.0.1:0"}},
                **resources(rt)).start()
    yield g
    g.stop()


def ws_url(gw: Gateway, query: str = "model=rt-voice") -> str:
    return gw.url.replace("http://", "ws://") + "/v1/realtime" + ("?" + query if query else "")


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def next_event(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0) -> dict[str, Any]:
    msg = await ws.receive(timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return orjson.loads(msg.data)


# -- auth and models ------------------------------------------------------------------------------

async def test_bearer_key_and_the_model_rewritten_in_the_upstream_url(gw: Gateway, rt: FakeRealtime) -> None:
    rt.script = Script(on_open=[text({"type": "session.created", "session": {"model": "gpt-realtime"}})])
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        assert ws._response.headers["x-aisix-request-id"]
        assert (await next_event(ws))["type"] == "session.created"
    up = rt.session()
    assert (up.path, dict(up.query)) == ("/v1/realtime", {"model": "gpt-realtime"})
    assert up.headers["Authorization"] == f"Bearer {PROVIDER_SECRET}"
    assert KEY not in str(up.headers)


async def test_browser_subprotocols_authenticate_and_only_realtime_is_echoed(gw: Gateway, rt: FakeRealtime) -> None:
    protocols = ("realtime", f"openai-insecure-api-key.{KEY}", "openai-beta.realtime-v1")
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), protocols=protocols) as ws:
        assert ws.protocol == "realtime"
        await ws.send_str('{"type":"response.cancel"}')
        await rt.until(lambda ss: len(ss) == 1 and len(ss[0].frames) == 1)
    up = rt.session()
    assert up.headers["Sec-WebSocket-Protocol"] == "openai-beta.realtime-v1"  # never the key, nor "realtime"
    assert KEY not in str(up.headers)


async def raw_upgrade(gw: Gateway, query: str, headers: dict[str, str], upgrade: bool = True
                      ) -> tuple[int, dict[str, Any]]:
    """A handshake the gateway refuses: its status and envelope."""
    h = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
         "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()} if upgrade else {}
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/v1/realtime?{query}", headers={**h, **headers}) as r:
        return r.status, await r.json()


@pytest.mark.parametrize(("query", "headers", "status", "code"), [
    ("model=rt-voice", {}, 401, "invalid_api_key"),
    ("model=rt-voice", {"Authorization": "Bearer sk-wrong"}, 401, "invalid_api_key"),
    ("model=rt-voice", {"Sec-WebSocket-Protocol": "realtime, openai-insecure-api-key.sk-nope"}, 401,
     "invalid_api_key"),
    ("model=nope", bearer(), 404, "model_not_found"),
    ("model=secret-model", bearer(), 403, "model_not_allowed"),
    ("model=whisper-prod", bearer(), 400, "model_not_supported"),
    ("", bearer(), 400, "missing_model"),
    ("intent=other", bearer(), 400, "missing_model"),
])
async def test_refusals_are_http_envelopes(gw: Gateway, rt: FakeRealtime, query: str, headers: dict[str, str],
                                           status: int, code: str) -> None:
    got, body = await raw_upgrade(gw, query, headers)
    assert (got, body["error"]["code"]) == (status, code)
    assert rt.sessions == []


async def test_a_browser_key_without_the_realtime_subprotocol_is_refused_and_never_logged(
        gw: Gateway, rt: FakeRealtime) -> None:
    # A browser fails a handshake that chooses none of its subprotocols, and aiohttp's handshake
    # logged the whole list (the key in it) when none was one it serves.
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
               "Sec-WebSocket-Protocol": f"openai-insecure-api-key.{KEY}, openai-beta.realtime-v1"}
    async with aiohttp.ClientSession() as s, s.get(ws_url(gw).replace("ws://", "http://"), headers=headers) as r:
        assert (r.status, (await r.json())["error"]["code"]) == (400, "missing_subprotocol")
        rid = r.headers["x-aisix-request-id"]
    assert rt.sessions == []
    gw.wait_log(f"rid={rid}")  # its access line: whatever the handshake logged came before it
    assert KEY not in gw.log()


async def test_a_browser_key_with_a_quote_in_it_is_cut_out_of_the_handshakes_warning(
        rt: FakeRealtime, tmp_path) -> None:
    # The key subprotocol on a Sec-WebSocket-Protocol line of its own, "realtime" on a second:
    # the gateway reads every line (and accepts the key), aiohttp's handshake only the first, and
    # warns that it does not overlap, with the list's repr. A key is any string without a space
    # (header tokens allow "'"): with a quote in it, the repr is double-quoted, and the redaction
    # stopped at the quote, writing the rest of the key.
    from multidict import CIMultiDict

    quoted = "zz'" + os.urandom(8).hex() + "-quoted-canary"
    doc = resources(rt)
    doc["api_keys"].append({"display_name": "quoted", "key_hash": hash_key(quoted), "allowed_models": ["rt-*"]})
    g = Gateway(tmp_path, rt.base_url, **doc).start()
    try:
        headers = CIMultiDict([
            ("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", base64.b64encode(os.urandom(16)).decode()),
            ("Sec-WebSocket-Protocol", f"openai-insecure-api-key.{quoted}"),
            ("Sec-WebSocket-Protocol", "realtime")])
        async with aiohttp.ClientSession() as s, s.get(f"{g.url}/v1/realtime", headers=headers) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (400, "missing_model")  # past the key
            rid = r.headers["x-aisix-request-id"]
        g.wait_log(f"rid={rid}")  # its access line, after whatever the handshake logged
        log = g.log()
        assert "openai-insecure-api-key.[redacted]" in log  # the warning was written
        assert "quoted-canary" not in log
    finally:
        g.stop()


async def test_a_get_without_upgrade_is_426(gw: Gateway) -> None:
    status, body = await raw_upgrade(gw, "model=rt-voice", bearer(), upgrade=False)
    assert (status, body["error"]["code"]) == (426, "websocket_required")


@pytest.mark.parametrize("request_line", [b"HEAD /v1/realtime?model=rt-voice HTTP/1.1",
                                          b"GET /v1/realtime?model=rt-voice HTTP/1.0"])
async def test_head_and_http_1_0_cannot_upgrade(gw: Gateway, rt: FakeRealtime, request_line: bytes) -> None:
    # aiohttp's check let both through: a 101, and an upstream session opened for it.
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request_line + b"\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                 b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) +
                 b"\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.split(b" ")[1] == b"426"
    assert rt.handshakes == 0 and rt.sessions == []


async def test_an_upstream_429_passes_its_retry_after_on(gw: Gateway, rt: FakeRealtime) -> None:
    rt.script = Script(refuse=429, retry_after="7")
    async with aiohttp.ClientSession() as s, s.get(ws_url(gw).replace("ws://", "http://"), headers={
            **bearer(), "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}) as r:
        assert (r.status, r.headers.get("Retry-After")) == (429, "7")
        assert (await r.json())["error"]["code"] == "upstream_error"


async def test_an_upstream_refusing_the_handshake_is_the_callers_status(gw: Gateway, rt: FakeRealtime) -> None:
    rt.script = Script(refuse=400)
    status, body = await raw_upgrade(gw, "model=rt-voice", bearer())
    assert (status, body["error"]["code"]) == (400, "upstream_error")


async def test_an_upstream_redirect_is_not_followed(gw: Gateway, rt: FakeRealtime) -> None:
    # aiohttp follows a handshake's redirect to any host, and drops only Authorization on the way:
    # an Azure provider key (api-key) went along. The audio routes never follow one either.
    elsewhere = rt.base_url.replace("127.0.0.1", "localhost")  # another origin, the same fake
    rt.script = Script(redirect=f"{elsewhere}/realtime?model=gpt-realtime&redirected=1")
    for alias in ("rt-azure", "rt-voice"):
        status, body = await raw_upgrade(gw, f"model={alias}", bearer())
        assert (status, body["error"]["code"]) == (502, "upstream_error")
        assert "HTTP 302" in body["error"]["message"]
    assert rt.sessions == []


async def test_a_refused_one_target_session_names_its_upstream_model(gw: Gateway, rt: FakeRealtime) -> None:
    # As on the audio routes: an alias with one target names it once resolved, not only once connected.
    # A 401 is the provider refusing the gateway's key, not the caller's: a 502 of the gateway's own.
    rt.script = Script(refuse=401)
    async with aiohttp.ClientSession() as s, s.get(ws_url(gw).replace("ws://", "http://"), headers={
            **bearer(), "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}) as r:
        assert (r.status, (await r.json())["error"]["code"]) == (502, "upstream_auth_failed")
        rid = r.headers["x-aisix-request-id"]
    event = gw.event(rid)
    assert (event["upstream_model"], event["provider_key"]) == ("gpt-realtime", "fake")
    gw.wait_log("the upstream refused provider key 'fake' (HTTP 401)")  # stderr is written by a thread


async def test_a_caller_leaving_during_the_upstream_handshake_is_recorded_and_frees_the_provider_slot(
        make_gateway, rt: FakeRealtime) -> None:
    res = resources(rt)
    res["provider_keys"].append({"display_name": "narrow", "provider": "openai", "api_base": rt.base_url,
                                 "api_key": "narrow-secret", "rate_limit": {"concurrency": 1}})
    res["models"].append({"display_name": "rt-narrow-key", "provider_key": "narrow", "model_name": "gpt-n",
                          "routes": ["realtime"]})
    gw = make_gateway({"metrics": {"listen": "127.0.0.1:0"}}, upstream_base=rt.base_url, **res)
    rt.script = Script(hold_handshake=True)
    async with aiohttp.ClientSession() as s:
        leaving = asyncio.create_task(s.ws_connect(ws_url(gw, "model=rt-narrow-key"), headers=bearer()))
        await rt.until(lambda _: rt.handshakes == 1)
        leaving.cancel()  # the caller goes while the upstream has not answered
        with contextlib.suppress(asyncio.CancelledError):
            await leaving
    event = gw.events(1)[-1]
    assert (event["status"], event["error_code"]) == (499, "client_closed")
    assert [(a["provider_key"], a["status"], a["error"]) for a in event["attempts"]] == [("narrow", None, None)]
    async with aiohttp.ClientSession() as s, s.get(gw.metrics_url + "/metrics") as r:
        assert 'aisix_upstream_attempts_total{model="rt-narrow-key",outcome="aborted",provider_key="narrow"} 1.0' \
            in await r.text()
    rt.script = Script()
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw, "model=rt-narrow-key"), headers=bearer()):
        pass  # the provider key's one slot was given back


async def test_connect_fails_over_to_the_next_target(gw: Gateway, rt: FakeRealtime) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw, "model=rt-failover"), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        assert dict(rt.session().query) == {"model": "gpt-alive"}
    event = gw.event(rid)
    assert [(a["provider_key"], a["status"], a["error"]) for a in event["attempts"]] == [
        ("dead", None, "connect"), ("fake", 101, None)]


async def test_azure_url_and_api_key(gw: Gateway, rt: FakeRealtime) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw, "model=rt-azure"), headers=bearer()):
        up = rt.session()
    assert up.path == "/openai/realtime"
    assert dict(up.query) == {"api-version": "2025-04-01-preview", "deployment": "my deployment"}
    assert up.headers["api-key"] == AZURE_SECRET and "Authorization" not in up.headers


# -- transcription sessions -----------------------------------------------------------------------

@pytest.mark.parametrize(("update", "where"), [
    ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "transcription": {"model": "rt-transcribe", "language": "en"}}}}}, ("audio", "input", "transcription")),
    ({"type": "transcription_session.update", "session": {"input_audio_transcription": {
        "model": "rt-transcribe"}}}, ("input_audio_transcription",)),
])
async def test_transcription_model_in_the_session_update_is_resolved_and_rewritten(
        gw: Gateway, rt: FakeRealtime, update: dict[str, Any], where: tuple[str, ...]) -> None:
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(ws_url(gw, "intent=transcription"), headers=bearer()) as ws:
        early = {"type": "input_audio_buffer.append", "audio": "AAAA"}
        await ws.send_str(orjson.dumps(early).decode())  # held until the model is known
        await ws.send_str(orjson.dumps(update).decode())
        up = (await rt.until(lambda ss: len(ss) == 1 and len(ss[0].frames) == 2))[0]
    assert (up.path, dict(up.query)) == ("/v1/realtime", {"intent": "transcription"})
    first, second = up.events()
    assert first == early
    holder = second["session"]
    for step in where:
        holder = holder[step]
    assert holder["model"] == "gpt-4o-transcribe"
    expected = dict(update)
    assert {k: v for k, v in second.items() if k != "session"} == {k: v for k, v in expected.items() if k != "session"}


@pytest.mark.parametrize(("key", "alias", "code"), [
    (KEY, "nope", "model_not_found"),
    (NARROW, "rt-voice", "model_not_allowed"),
    (KEY, "whisper-prod", "model_not_supported"),
])
async def test_a_bad_transcription_alias_gets_an_error_event_and_is_not_forwarded(
        gw: Gateway, rt: FakeRealtime, key: str, alias: str, code: str) -> None:
    update = {"type": "session.update", "event_id": "evt_1",
              "session": {"audio": {"input": {"transcription": {"model": alias}}}}}
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(ws_url(gw, "intent=transcription"), headers=bearer(key)) as ws:
        await ws.send_str(orjson.dumps(update).decode())
        event = await next_event(ws)
        assert event["type"] == "error"
        assert event["error"]["type"] == "invalid_request_error"
        assert (event["error"]["code"], event["error"]["event_id"]) == (code, "evt_1")
        update["session"]["audio"]["input"]["transcription"]["model"] = "rt-transcribe"  # type: ignore[index]
        await ws.send_str(orjson.dumps(update).decode())  # a good one then connects
        up = (await rt.until(lambda ss: len(ss) == 1 and len(ss[0].frames) == 1))[0]
    assert len(up.frames) == 1 and b"gpt-4o-transcribe" in up.frames[0][1]


async def test_transcription_model_inside_a_model_session(gw: Gateway, rt: FakeRealtime) -> None:
    """In a session opened with ?model=, a transcription alias is checked and rewritten too; one
    served only by another provider cannot be used there."""
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        for alias in ("rt-elsewhere", "rt-transcribe"):
            await ws.send_str(orjson.dumps({"type": "session.update", "session": {
                "audio": {"input": {"transcription": {"model": alias}}}}}).decode())
        assert (await next_event(ws))["error"]["code"] == "model_not_supported"
        up = (await rt.until(lambda ss: len(ss) == 1 and len(ss[0].frames) == 1))[0]
    assert up.events()[0]["session"]["audio"]["input"]["transcription"]["model"] == "gpt-4o-transcribe"


@pytest.mark.parametrize("second", ["gpt-4o-transcribe", "rt-voice", 7])
async def test_every_transcription_model_a_frame_names_is_checked(gw: Gateway, rt: FakeRealtime,
                                                                 second: object) -> None:
    # Only the first place a frame named a model was rewritten: a raw upstream name (or an alias
    # the key may not use) in the second went upstream as sent, round allowed_models.
    update = {"type": "session.update", "event_id": "evt_2", "session": {
        "audio": {"input": {"transcription": {"model": "rt-transcribe"}}},
        "input_audio_transcription": {"model": second}}}
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(ws_url(gw, "intent=transcription"), headers=bearer(NARROW)) as ws:
        await ws.send_str(orjson.dumps(update).decode())
        error = await next_event(ws)
        assert (error["type"], error["error"]["event_id"]) == ("error", "evt_2")
        assert error["error"]["code"] == ("missing_model" if second == 7 else
                                          "model_not_found" if second == "gpt-4o-transcribe" else "model_not_allowed")
        update["session"]["input_audio_transcription"]["model"] = "rt-transcribe"  # type: ignore[index]
        await ws.send_str(orjson.dumps(update).decode())
        up = (await rt.until(lambda ss: len(ss) >= 1 and len(ss[-1].frames) == 1))[-1]
    sent = up.events()[0]["session"]
    assert sent["audio"]["input"]["transcription"]["model"] == sent["input_audio_transcription"]["model"] == \
        "gpt-4o-transcribe"


@pytest.mark.parametrize(("query", "session"), [
    ("model=rt-voice", {"audio": {"input": {"transcription": {"language": "en"}}}}),
    ("model=rt-voice", {"audio": {"input": {"transcription": {"model": "rt-transcribe"}}},
                        "input_audio_transcription": {"prompt": "names"}}),
    ("intent=transcription", {"input_audio_transcription": {}}),
])
async def test_a_transcription_configuration_without_a_model_is_refused(
        gw: Gateway, rt: FakeRealtime, query: str, session: dict[str, Any]) -> None:
    # Without one the provider transcribes with its default model: not an alias the key may use,
    # and priced at the session model's prices while billed at the default's.
    update = {"type": "session.update", "event_id": "evt_4", "session": session}
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw, query), headers=bearer()) as ws:
        await ws.send_str(orjson.dumps(update).decode())
        error = await next_event(ws)
        assert (error["type"], error["error"]["code"], error["error"]["event_id"]) == ("error", "missing_model", "evt_4")
        assert "Name the transcription model" in error["error"]["message"]
        await ws.send_str(_update("rt-transcribe"))  # with one, it goes on
        up = (await rt.until(lambda ss: len(ss) == 1 and len(ss[0].frames) == 1))[0]
    events = up.events()
    assert [e["event_id"] for e in events] == ["e-rt-transcribe"]
    assert events[0]["session"]["audio"]["input"]["transcription"]["model"] == "gpt-4o-transcribe"


@pytest.mark.parametrize(("named", "code"), [("rt-voice", None), ("gpt-realtime", None),
                                             ("rt-elsewhere", "model_not_supported"),
                                             ("gpt-4o-transcribe", "model_not_supported"),
                                             (None, "missing_model")])
async def test_the_sessions_own_model_cannot_be_changed_by_session_update(
        gw: Gateway, rt: FakeRealtime, named: str | None, code: str | None) -> None:
    # session.model went upstream unchecked: a caller could move its session to another model
    # (its price, its access) if the provider honoured it.
    update = {"type": "session.update", "event_id": "evt_3", "session": {"type": "realtime", "model": named}}
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        await ws.send_str(orjson.dumps(update).decode())
        if code is not None:
            error = await next_event(ws)
            assert (error["type"], error["error"]["code"], error["error"]["event_id"]) == ("error", code, "evt_3")
        await ws.send_str('{"type":"response.cancel"}')
        up = (await rt.until(lambda ss: len(ss) == 1 and len(ss[0].frames) >= 1 and ss[0].frames[-1][1].endswith(
            b'"response.cancel"}')))[0]
    sent = up.events()
    if code is None:
        assert sent[0]["session"] == {"type": "realtime", "model": "gpt-realtime"}
    assert sent[-1] == {"type": "response.cancel"} and len(sent) == (1 if code else 2)


async def test_an_escaped_event_type_is_still_checked(gw: Gateway, rt: FakeRealtime) -> None:
    frame = b'{"type":"session\\u002eupdate","session":{"audio":{"input":{"transcription":{"model":"nope"}}}}}'
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        await ws.send_str(frame.decode())
        assert (await next_event(ws))["error"]["code"] == "model_not_found"
        await ws.send_str('{"type":"response.cancel"}')
        up = (await rt.until(lambda ss: len(ss) == 1 and len(ss[0].frames) == 1))[0]
    assert up.events() == [{"type": "response.cancel"}]


async def test_an_unreadable_or_binary_event_cannot_slip_past(gw: Gateway, rt: FakeRealtime) -> None:
    """Text naming a checked event that orjson cannot read (here behind a byte order mark) is
    refused; a JSON event in a binary frame is checked like a text one; audio passes."""
    update = b'{"type":"session.update","session":{"audio":{"input":{"transcription":{"model":"nope"}}}}}'
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        await ws.send_str("\ufeff" + update.decode())
        assert (await next_event(ws))["error"]["code"] == "invalid_json"
        await ws.send_bytes(update)
        assert (await next_event(ws))["error"]["code"] == "model_not_found"
        audio = b"{\\" + bytes(range(256))  # binary that starts like JSON and is not
        await ws.send_bytes(audio)
        up = (await rt.until(lambda ss: len(ss) == 1 and len(ss[0].frames) == 1))[0]
    assert up.frames == [("binary", audio)]


# -- the relay ------------------------------------------------------------------------------------

async def test_a_thousand_frames_each_way_in_order_byte_for_byte(gw: Gateway, rt: FakeRealtime) -> None:
    rng = random.Random(15)

    def frame(i: int) -> tuple[str, bytes]:
        if i % 2:
            return "binary", i.to_bytes(4, "big") + rng.randbytes(rng.randrange(0, 3000))
        return "text", orjson.dumps({"type": "input_audio_buffer.append", "i": i,
                                     "audio": base64.b64encode(rng.randbytes(rng.randrange(0, 2000))).decode()})

    downstream = [frame(i) for i in range(1000)]
    upstream = [frame(i) for i in range(1000)]
    rt.script = Script(on_open=downstream)
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer(), max_msg_size=0) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        for kind, data in upstream:
            await (ws.send_str(data.decode()) if kind == "text" else ws.send_bytes(data))
        got = []
        for _ in range(1000):
            msg = await ws.receive(10)
            got.append(("text", msg.data.encode()) if msg.type == aiohttp.WSMsgType.TEXT else ("binary", msg.data))
        assert got == downstream
        await rt.until(lambda ss: len(ss[0].frames) == 1000)
    assert rt.session().frames == upstream
    event = gw.event(rid)
    assert event["bytes_in"] == sum(len(d) for _, d in upstream)
    assert event["bytes_out"] == sum(len(d) for _, d in downstream)


async def test_a_transcription_upstream_that_cannot_be_opened_ends_the_session(make_gateway, rt: FakeRealtime) -> None:
    # The session was upgraded before its upstream was opened; it never reached one, so it costs
    # nothing (it was charged per_request, budget included).
    res = resources(rt, rate_limit={"cost_usd_per_day": 1.0})
    res["models"].append({"display_name": "rt-deadscribe", "provider_key": "dead", "model_name": "gpt-4o-transcribe",
                          "routes": ["realtime"], "pricing": {"per_request": 2.0}})
    gw = make_gateway(upstream_base=rt.base_url, **res)
    update = {"type": "session.update", "event_id": "evt_9",
              "session": {"audio": {"input": {"transcription": {"model": "rt-deadscribe"}}}}}
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(ws_url(gw, "intent=transcription"), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        await ws.send_str(orjson.dumps(update).decode())
        error = await next_event(ws)
        assert (error["type"], error["error"]["code"], error["error"]["event_id"]) == (
            "error", "upstream_unavailable", "evt_9")
        msg = await ws.receive(10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1014)
    event = gw.event(rid)
    assert (event["status"], event["error_code"], event["close_code"]) == (101, "upstream_unavailable", 1014)
    assert "cost_usd" not in event
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()):
        pass  # the day's budget of 1 USD was not charged the 2 USD


@pytest.mark.parametrize("held", [[b"x" * 65536] * 17, [b""] * 20000], ids=["bytes", "empty-frames"])
async def test_what_a_transcription_session_holds_before_naming_its_model_is_bounded(
        gw: Gateway, rt: FakeRealtime, held: list[bytes]) -> None:
    # Held frames were counted by their payload alone: empty frames (6 bytes each on the wire)
    # were held without limit, about 70 bytes of the gateway's memory each, 20 MiB for 300,000.
    rt.script = Script(on_open=[text({"type": "session.created"})])
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(ws_url(gw, "intent=transcription"), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        for frame in held:
            await ws.send_bytes(frame)
        await ws.send_str(_update("rt-transcribe"))
        error = await next_event(ws)
        assert (error["type"], error["error"]["code"]) == ("error", "session_not_configured")
        msg = await ws.receive(10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1008)
    event = gw.event(rid)
    assert (event["error_code"], event["close_code"]) == ("session_not_configured", 1008)
    assert rt.handshakes == 0


async def test_close_codes_are_relayed_both_ways(gw: Gateway, rt: FakeRealtime) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ws_url(gw), headers=bearer()) as ws:
            rt.session()
            await ws.close(code=4001, message=b"caller says bye")
        await rt.until(lambda ss: ss[0].ended)
        assert rt.session().close_code == 4001
        rt.reset()
        rt.script = Script(close_after_open=4002)
        async with s.ws_connect(ws_url(gw), headers=bearer()) as ws:
            msg = await ws.receive(10)
            assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 4002, "scripted")


async def test_either_side_going_away_closes_the_other(gw: Gateway, rt: FakeRealtime) -> None:
    rt.script = Script(abort_after_open=True)
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ws_url(gw), headers=bearer()) as ws:
            rid = ws._response.headers["x-aisix-request-id"]
            msg = await ws.receive(10)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1014)
        assert gw.event(rid)["error_code"] == "upstream_aborted"
        rt.reset()
        ws = await s.ws_connect(ws_url(gw), headers=bearer())
        rt.session()
        ws._response.connection.transport.abort()  # type: ignore[union-attr]  # gone, no close frame
        await rt.until(lambda ss: ss[0].ended)
        assert rt.session().close_code == 1001


HEARTBEAT = {"proxy": {"realtime_heartbeat_ms": 300}}


async def test_an_upstream_that_stops_answering_pings_ends_the_session(make_gateway, rt: FakeRealtime) -> None:
    gw = make_gateway(HEARTBEAT, upstream_base=rt.base_url, **resources(rt))
    rt.script = Script(read=False)  # the fake's aiohttp answers pings only while it reads
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        msg = await ws.receive(10)  # this caller answers the gateway's pings meanwhile
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1014)
    event = gw.event(rid)
    assert (event["status"], event["error_code"], event["close_code"]) == (101, "upstream_timeout", 1014)


async def test_a_caller_that_stops_answering_pings_ends_the_session(make_gateway, rt: FakeRealtime) -> None:
    gw = make_gateway(HEARTBEAT, upstream_base=rt.base_url, **resources(rt))
    rt.script = Script(echo=True)
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer(), autoping=False) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        await rt.until(lambda ss: len(ss) == 1 and ss[0].ended)  # this caller never reads: no pong goes back
    assert rt.session().close_code == 1001  # the upstream is told the caller went
    event = gw.event(rid)
    assert (event["status"], event["error_code"]) == (101, "client_timeout")


async def test_a_caller_that_stops_reading_altogether_is_cut_off_not_waited_for(make_gateway, rt: FakeRealtime) -> None:
    # Its socket fills with the upstream's frames and it answers no ping: the heartbeat ends the
    # session, and the close frame to it waited for room in that socket without end (aiohttp's
    # drain has no timeout): the upstream stayed open and the key's only slot was held for good.
    gw = make_gateway(HEARTBEAT, upstream_base=rt.base_url, **resources(rt, rate_limit={"concurrency": 1}))
    rt.script = Script(flood=(4096, 64 * 1024))
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v1/realtime?model=rt-voice HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                 b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " +
                 base64.b64encode(os.urandom(16)) + b"\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # then nothing more is read
    rid = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
               if line.lower().startswith(b"x-aisix-request-id:"))
    try:
        await rt.until(lambda ss: len(ss) == 1 and ss[0].ended, timeout=30)
        assert gw.event(rid)["error_code"] == "client_timeout"
        async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()):
            pass  # the key's one concurrency slot is free again
    finally:
        writer.transport.abort()


async def test_a_caller_stalled_behind_an_upstream_that_stops_reading_is_not_blamed(
        make_gateway, rt: FakeRealtime) -> None:
    # The caller floods an upstream that reads nothing: the gateway's pump from the caller is stuck
    # handing a frame on, so it cannot read the caller's pongs (nor can this caller answer, busy
    # sending). Both owe a pong; only the upstream was free to answer, and it is the one blamed.
    gw = make_gateway(HEARTBEAT, upstream_base=rt.base_url, **resources(rt))
    rt.script = Script(read=False)
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]

        async def flood() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(1024):
                    await ws.send_bytes(bytes(64 * 1024))

        sending = asyncio.create_task(flood())
        msg = await ws.receive(20)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1014)
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
    event = gw.event(rid)
    assert (event["status"], event["error_code"]) == (101, "upstream_timeout")


async def test_a_quiet_session_that_answers_pings_stays_open(make_gateway, rt: FakeRealtime) -> None:
    gw = make_gateway(HEARTBEAT, upstream_base=rt.base_url, **resources(rt))
    rt.script = Script(echo=True)
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer(), autoping=False) as ws:
        for _ in range(4):  # four heartbeats with nothing else said either way
            msg = await ws.receive(10)
            assert msg.type == aiohttp.WSMsgType.PING
            await ws.pong(msg.data)
        await ws.send_bytes(b"still here")
        msg = await ws.receive(10)
        while msg.type == aiohttp.WSMsgType.PING:
            await ws.pong(msg.data)
            msg = await ws.receive(10)
        assert msg.data == b"still here"
    assert rt.session().frames == [("binary", b"still here")]  # pings never reach the other side


async def test_pings_are_answered(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer(), autoping=False) as ws:
        await ws.ping(b"are you there")
        msg = await ws.receive(10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.PONG, b"are you there")


async def test_a_caller_that_stops_reading_stalls_the_upstream_with_bounded_memory(
        gw: Gateway, rt: FakeRealtime) -> None:
    """The upstream floods 64 MiB; the caller reads nothing. The upstream's sends stall after a
    few MiB (socket buffers and aiohttp's queues) and the gateway's memory stays flat (measured:
    about 11 MiB sent, under 1 MiB of growth); once the caller reads, every frame arrives, in order."""
    count, size = 1024, 64 * 1024
    rt.script = Script(flood=(count, size))
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer(), max_msg_size=0) as ws:
        before = gw.rss_kib()
        gw.reset_peak()
        # Stalled: the fake's count stops moving (it is checked every 0.3 s; a measurement, not a sync).
        last, deadline = -1, time.monotonic() + 20
        while True:
            sent = rt.session().sent
            if sent == last or time.monotonic() > deadline:
                break
            last = sent
            await asyncio.sleep(0.3)
        # Most of what was sent sits in the kernel's socket buffers (loopback autotunes them to a
        # few MiB each, and there are two connections); none of it in the gateway.
        assert sent < 32 * 1024 * 1024, f"upstream sent {sent} bytes to a caller that reads nothing"
        grown = gw.peak_rss_kib() - before
        assert grown < 24 * 1024, f"gateway grew {grown} KiB"
        for i in range(count):
            msg = await ws.receive(10)
            assert msg.type == aiohttp.WSMsgType.BINARY and int.from_bytes(msg.data[:4], "big") == i
    assert rt.session().sent == count * size


async def test_an_upstream_that_stops_reading_stalls_the_caller(gw: Gateway, rt: FakeRealtime) -> None:
    """The other way: the caller floods 64 MiB to an upstream that reads nothing (measured: the
    caller's sends stall after about 16 MiB, all of it in socket buffers)."""
    rt.script = Script(read=False)
    chunk = bytes(64 * 1024)
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rt.session()
        before = gw.rss_kib()
        gw.reset_peak()
        sent = 0

        async def flood() -> None:
            nonlocal sent
            for _ in range(1024):
                await ws.send_bytes(chunk)
                sent += len(chunk)

        task = asyncio.create_task(flood())
        last, deadline = -1, time.monotonic() + 20
        while sent != last and time.monotonic() < deadline:
            last = sent
            await asyncio.sleep(0.3)
        assert not task.done() and sent < 32 * 1024 * 1024, sent
        grown = gw.peak_rss_kib() - before
        assert grown < 24 * 1024, f"gateway grew {grown} KiB"
        rt.resume_reading()
        await asyncio.wait_for(task, 20)
        await rt.until(lambda ss: len(ss[0].frames) == 1024)


# -- policies and records -------------------------------------------------------------------------

def usage_frames() -> list[tuple[str, bytes]]:
    return [
        text({"type": "conversation.item.input_audio_transcription.completed", "item_id": "i1",
              "transcript": "the secret sauce is ketchup",
              "usage": {"type": "tokens", "input_tokens": 7, "output_tokens": 3, "total_tokens": 10}}),
        text({"type": "response.done", "response": {"usage": {"total_tokens": 30, "input_tokens": 20,
                                                               "output_tokens": 10}}}),
        text({"type": "conversation.item.input_audio_transcription.completed", "item_id": "i2",
              "transcript": "ok", "usage": {"type": "duration", "seconds": 2.5}}),
    ]


async def test_one_usage_event_per_session_with_the_reported_usage(gw: Gateway, rt: FakeRealtime) -> None:
    rt.script = Script(on_open=usage_frames())
    started = time.monotonic()
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        for _ in range(3):
            await next_event(ws)
        await ws.send_bytes(b"\x01\x02\x03")
        await rt.until(lambda ss: len(ss[0].frames) == 1)
    length_ms = (time.monotonic() - started) * 1000
    event = gw.event(rid)
    assert {k: event[k] for k in ("route", "status", "error_code", "api_key", "model", "upstream_model",
                                  "provider_key", "close_code", "stream", "bytes_in")} == {
        "route": "realtime", "status": 101, "error_code": None, "api_key": "rt", "model": "rt-voice",
        "upstream_model": "gpt-realtime", "provider_key": "fake", "close_code": 1000, "stream": True, "bytes_in": 3}
    assert event["bytes_out"] == sum(len(d) for _, d in usage_frames())
    assert (event["input_tokens"], event["output_tokens"], event["total_tokens"], event["audio_seconds"]) == (
        27, 13, 40, 2.5)
    assert event["guardrail"] == {"name": "watch-sauce", "action": "monitored"}  # output: recorded only
    assert 0 < event["latency_ms"] <= length_ms + 1000
    assert [e["request_id"] for e in gw.events(0)].count(rid) == 1


async def test_input_guardrails_block_item_text_and_instructions(gw: Gateway, rt: FakeRealtime) -> None:
    blocked = [
        {"type": "conversation.item.create", "event_id": "e1", "item": {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "my PassWord is hunter2"}]}},
        {"type": "session.update", "event_id": "e2", "session": {"instructions": "reveal the password"}},
    ]
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        for event in blocked:
            await ws.send_str(orjson.dumps(event).decode())
            error = await next_event(ws)
            assert (error["type"], error["error"]["code"], error["error"]["event_id"]) == (
                "error", "guardrail_blocked", event["event_id"])
        fine = {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "hello"}]}}
        await ws.send_str(orjson.dumps(fine).decode())
        up = (await rt.until(lambda ss: len(ss[0].frames) == 1))[0]
    assert up.events() == [fine]
    assert gw.event(rid)["guardrail"] == {"name": "no-passwords", "action": "blocked"}


async def test_the_concurrency_slot_is_held_for_the_sessions_life(make_gateway, rt: FakeRealtime) -> None:
    gw = make_gateway(upstream_base=rt.base_url, **resources(rt, rate_limit={"concurrency": 1}))
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ws_url(gw), headers=bearer()) as ws:
            rid = ws._response.headers["x-aisix-request-id"]
            status, body = await raw_upgrade(gw, "model=rt-voice", bearer())
            assert (status, body["error"]["code"]) == (429, "concurrency_limit_exceeded")
        gw.event(rid)  # written once the slot is given back
        async with s.ws_connect(ws_url(gw), headers=bearer()):
            pass


async def test_a_budget_spent_mid_session_closes_it_with_1008(make_gateway, rt: FakeRealtime) -> None:
    res = resources(rt, rate_limit={"cost_usd_per_day": 0.0001})
    res["models"][0]["pricing"] = {"per_1m_input_tokens": 5.0, "per_1m_output_tokens": 5.0}
    gw = make_gateway(upstream_base=rt.base_url, **res)
    rt.script = Script(on_open=usage_frames())
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        assert (await next_event(ws))["usage"]["total_tokens"] == 10  # $0.00005 of $0.0001: on
        assert (await next_event(ws))["type"] == "response.done"  # $0.0002 more: relayed, then
        error = await next_event(ws)
        assert (error["type"], error["error"]["code"]) == ("error", "budget_exceeded")
        msg = await ws.receive(10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1008)
    event = gw.event(rid)
    assert (event["error_code"], event["close_code"]) == ("budget_exceeded", 1008)
    assert event["cost_usd"] == pytest.approx(0.0002)
    status, body = await raw_upgrade(gw, "model=rt-voice", bearer())
    assert (status, body["error"]["code"]) == (429, "budget_exceeded")  # spent for the day


async def scrape_cost(gw: Gateway, alias: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(gw.metrics_url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(f'aisix_cost_usd_total{{model="{alias}"}} '):
                return float(line.rpartition(" ")[2])
    return 0.0


async def test_a_session_costs_per_request_once_and_transcriptions_at_their_models_prices(
        make_gateway, rt: FakeRealtime) -> None:
    # A session is one request: per_request once, however many responses it reports (it was
    # charged per report). Transcription usage is priced by the transcription alias named in
    # session.update, without its per_request. The budget is charged what the event says, and the
    # cost metric counts it.
    res = resources(rt, rate_limit={"cost_usd_per_day": 0.0125})
    res["models"][0]["pricing"] = {"per_request": 0.01, "per_1m_input_tokens": 4.0, "per_1m_output_tokens": 16.0}
    res["models"][1]["pricing"] = {"per_request": 5.0, "per_minute_input_audio": 0.006}
    gw = make_gateway({"metrics": {"listen": "127.0.0.1:0"}}, upstream_base=rt.base_url, **res)
    done = text({"type": "response.done", "response": {"usage": {"input_tokens": 7, "output_tokens": 3}}})
    heard = text({"type": "conversation.item.input_audio_transcription.completed", "item_id": "i",
                  "transcript": "hi", "usage": {"type": "duration", "seconds": 10}})
    rt.script = Script(replies={"response.create": [done], "session.update": [heard]})
    update = {"type": "session.update", "session": {"audio": {"input": {"transcription": {"model": "rt-transcribe"}}}}}
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        await ws.send_str(orjson.dumps(update).decode())
        assert (await next_event(ws))["type"] == "conversation.item.input_audio_transcription.completed"
        for _ in range(10):
            await ws.send_str('{"type":"response.create"}')
            assert (await next_event(ws))["type"] == "response.done"
    # 0.01 + 70 input tokens at 4/M + 30 output at 16/M + 10 s at 0.006/min
    expected = round(0.01 + 70 * 4 / 1e6 + 30 * 16 / 1e6 + 10 / 60 * 0.006, 8)
    event = gw.event(rid)
    assert event["cost_usd"] == expected
    assert await scrape_cost(gw, "rt-voice") == pytest.approx(expected)
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]  # 0.01176 of 0.0125: admitted
    assert gw.event(rid)["cost_usd"] == 0.01  # no usage reported: the request's price alone
    status, body = await raw_upgrade(gw, "model=rt-voice", bearer())
    assert (status, body["error"]["code"]) == (429, "budget_exceeded")  # the budget had both: 0.02176


def _cancelled(rid: str) -> list[tuple[str, bytes]]:
    """The Realtime API's answer to a response.cancel of a response under way: its response.done,
    status cancelled, with the usage of what it had generated."""
    return [text({"type": "response.done", "response": {"id": rid, "status": "cancelled",
                                                        "usage": {"input_tokens": 700, "output_tokens": 300}}})]


def _token_priced(rt: FakeRealtime) -> dict[str, Any]:
    res = resources(rt, rate_limit={"cost_usd_per_day": 0.005})
    res["models"][0]["pricing"] = {"per_1m_input_tokens": 4.0, "per_1m_output_tokens": 16.0}
    return res


async def test_a_caller_that_closes_mid_response_is_charged_what_the_cancelled_response_used(
        make_gateway, rt: FakeRealtime) -> None:
    # A response under way when the caller closes (here one server VAD began: no response.create)
    # is billed by the provider for what it generated; closing the upstream at once lost its
    # response.done, so it cost the key nothing. The gateway cancels it, reads its usage, then
    # closes the upstream; the caller gets its close answered at once.
    gw = make_gateway(upstream_base=rt.base_url, **_token_priced(rt))
    rt.script = Script(on_open=[text({"type": "response.created", "response": {"id": "r9", "status": "in_progress"}})],
                       replies={"response.cancel": _cancelled("r9")})
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        assert (await next_event(ws))["type"] == "response.created"
        await ws.close(code=1000)
        assert ws.close_code == 1000
    up = (await rt.until(lambda ss: ss[0].ended))[0]
    assert [(e["type"], e.get("response_id")) for e in up.events()] == [("response.cancel", "r9")]
    assert up.close_code == 1000  # the caller's code, once the usage is in
    event = gw.event(rid)
    assert (event["input_tokens"], event["output_tokens"]) == (700, 300)
    assert event["cost_usd"] == round(700 * 4 / 1e6 + 300 * 16 / 1e6, 8)  # 0.0076: over the 0.005 budget
    assert event["close_code"] == 1000
    status, body = await raw_upgrade(gw, "model=rt-voice", bearer())
    assert (status, body["error"]["code"]) == (429, "budget_exceeded")


async def test_a_caller_that_vanishes_right_after_response_create_is_charged_for_it(
        make_gateway, rt: FakeRealtime) -> None:
    # The cheapest way round a budget: ask for a response and drop the connection before the
    # provider has said anything. The provider still begins it (and bills it).
    gw = make_gateway(upstream_base=rt.base_url, **_token_priced(rt))
    rt.script = Script(replies={"response.create": [text({"type": "response.created", "response": {"id": "r1"}})],
                                "response.cancel": _cancelled("r1")})
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        await ws.send_str('{"type":"response.create"}')
        await rt.until(lambda ss: ss[0].frames != [])
        ws._response.connection.transport.abort()  # type: ignore[union-attr]  # gone, no close frame
    up = (await rt.until(lambda ss: ss[0].ended))[0]
    types = [e["type"] for e in up.events()]
    # one cancel, or two when the caller's leaving is seen before the response.created: one
    # without an id for the create, then one for the response it began (the provider answers
    # the second with an error, unread)
    assert types[0] == "response.create" and types[1:] in (["response.cancel"], ["response.cancel"] * 2)
    event = gw.event(rid)
    assert (event["total_tokens"], event["error_code"]) == (1000, "client_closed")
    status, body = await raw_upgrade(gw, "model=rt-voice", bearer())
    assert (status, body["error"]["code"]) == (429, "budget_exceeded")


async def test_a_response_create_the_provider_refused_is_not_waited_for(make_gateway, rt: FakeRealtime) -> None:
    # A response.create answered with an error never begins: the cancel sent for it at the
    # caller's close is answered with an error (nothing to cancel), and the session ends then.
    gw = make_gateway(upstream_base=rt.base_url, **resources(rt))
    refused = text({"type": "error", "error": {"type": "invalid_request_error", "code": "bad", "message": "no"}})
    rt.script = Script(replies={"response.create": [refused]})
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        await ws.send_str('{"type":"response.create"}')
        assert (await next_event(ws))["type"] == "error"
    up = (await rt.until(lambda ss: ss[0].ended))[0]
    assert [e["type"] for e in up.events()] == ["response.create", "response.cancel"]
    event = gw.event(rid)
    assert event["latency_ms"] < 4000 and event["close_code"] == 1000  # not CLOSE_TIMEOUT_S (5 s)


async def test_an_error_for_another_event_does_not_end_the_wait_for_a_response_the_caller_left(
        make_gateway, rt: FakeRealtime) -> None:
    # Any error event ended the collection while no response was created yet, taken for the
    # answer to the gateway's cancel of a refused response.create: a caller that sent an event
    # the provider refuses, then response.create, and left before either was answered, had the
    # response cancelled but never charged (a whole conversation's input tokens, per response).
    gw = make_gateway(upstream_base=rt.base_url, **_token_priced(rt))
    refused = text({"type": "error", "error": {"type": "invalid_request_error", "code": "item_not_found",
                                               "message": "no such item", "event_id": "evt_del"}})
    rt.script = Script(read=False, replies={"conversation.item.delete": [refused],
                                            "response.create": [text({"type": "response.created",
                                                                      "response": {"id": "r1"}})],
                                            "response.cancel": _cancelled("r1")})
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        await ws.send_str('{"type":"conversation.item.delete","event_id":"evt_del","item_id":"nope"}')
        await ws.send_str('{"type":"response.create"}')
        await ws.close(code=1000)  # answered at once: the relay has stopped, nothing was read from the upstream
    rt.resume_reading()
    await rt.until(lambda ss: ss[0].ended)
    event = gw.event(rid)
    assert (event["input_tokens"], event["output_tokens"], event["close_code"]) == (700, 300, 1000)
    status, body = await raw_upgrade(gw, "model=rt-voice", bearer())
    assert (status, body["error"]["code"]) == (429, "budget_exceeded")


async def test_a_transcription_session_has_no_responses_and_keeps_its_type(make_gateway, rt: FakeRealtime) -> None:
    # Opened with ?intent=transcription and no model, a session that asked for a response, or
    # turned itself into a realtime session, would run on the provider's default model: no alias
    # named it, so no key's access, limits or prices were checked for it. Refused, held or not.
    gw = make_gateway(upstream_base=rt.base_url, **resources(rt))
    refused = []
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(ws_url(gw, "intent=transcription"), headers=bearer()) as ws:
        await ws.send_str('{"type":"response.create","event_id":"evt_1"}')  # before the model is named
        refused.append(await next_event(ws))
        await ws.send_str(_update("rt-transcribe"))  # opens the upstream
        await ws.send_str('{"type":"session.update","event_id":"evt_2","session":{"type":"realtime"}}')
        refused.append(await next_event(ws))
        await ws.send_str('{"type":"response.create","event_id":"evt_3"}')
        refused.append(await next_event(ws))
        await ws.send_str('{"type":"session.update","session":{"type":"transcription"}}')  # its own type: fine
        up = (await rt.until(lambda ss: len(ss) == 1 and len(ss[0].frames) == 2))[0]
    assert [(e["type"], e["error"]["code"], e["error"]["event_id"]) for e in refused] == [
        ("error", "model_not_supported", f"evt_{i}") for i in (1, 2, 3)]
    assert [e["type"] for e in up.events()] == ["session.update", "session.update"]
    assert up.events()[1]["session"] == {"type": "transcription"}


async def test_a_response_done_read_from_the_upstream_is_charged_though_the_caller_left_before_getting_it(
        make_gateway, rt: FakeRealtime) -> None:
    # The caller reads nothing; the gateway has read the response.done (its transcript makes it
    # larger than the sockets hold) and waits for the caller's socket to take it when the caller
    # goes. Charged only once handed on, its usage was lost; and its response, thought still
    # under way, was cancelled at the caller's leaving and waited for in vain (CLOSE_TIMEOUT_S).
    gw = make_gateway(upstream_base=rt.base_url, **_token_priced(rt))
    done = text({"type": "response.done", "response": {
        "id": "r1", "status": "completed", "usage": {"input_tokens": 700, "output_tokens": 300},
        "output": [{"type": "message", "content": [{"type": "output_audio", "transcript": "la" * (6 << 20)}]}]}})
    rt.script = Script(on_open=[text({"type": "response.created", "response": {"id": "r1"}}), done])
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v1/realtime?model=rt-voice HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                 b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " +
                 base64.b64encode(os.urandom(16)) + b"\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    rid = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
               if line.lower().startswith(b"x-aisix-request-id:"))
    first = await asyncio.wait_for(reader.readexactly(2), 10)  # the response.created, small
    assert await reader.readexactly(first[1] & 0x7F)
    second = await asyncio.wait_for(reader.readexactly(2), 10)  # the response.done has begun to come
    assert (second[0] & 0x0F, second[1] & 0x7F) == (1, 127)  # text, 64-bit length: read no further
    writer.transport.abort()  # gone, no close frame
    up = (await rt.until(lambda ss: ss[0].ended))[0]
    assert up.events() == []  # nothing to cancel: the response had ended
    event = gw.event(rid)
    assert (event["input_tokens"], event["output_tokens"], event["error_code"]) == (700, 300, "client_closed")
    assert event["latency_ms"] < 4000  # not CLOSE_TIMEOUT_S (5 s)
    status, body = await raw_upgrade(gw, "model=rt-voice", bearer())
    assert (status, body["error"]["code"]) == (429, "budget_exceeded")


async def test_reported_audio_is_charged_to_the_audio_quota(make_gateway, rt: FakeRealtime) -> None:
    gw = make_gateway(upstream_base=rt.base_url, **resources(rt, rate_limit={"audio_seconds_per_hour": 10}))
    rt.script = Script(on_open=[text({"type": "conversation.item.input_audio_transcription.completed",
                                      "item_id": "i", "transcript": "hi",
                                      "usage": {"type": "duration", "seconds": 12}})])
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        assert (await next_event(ws))["type"] == "conversation.item.input_audio_transcription.completed"
        error = await next_event(ws)
        assert (error["type"], error["error"]["code"]) == ("error", "rate_limit_exceeded")
        assert "Audio quota of 10 seconds per hour" in error["error"]["message"]
        msg = await ws.receive(10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1008)
    assert gw.event(rid)["audio_seconds"] == 12
    status, body = await raw_upgrade(gw, "model=rt-voice", bearer())
    assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded")


async def test_a_token_limit_spent_mid_session_closes_it_with_1008(make_gateway, rt: FakeRealtime) -> None:
    gw = make_gateway(upstream_base=rt.base_url, **resources(rt, rate_limit={"tpm": 25}))
    rt.script = Script(on_open=usage_frames())
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        assert (await next_event(ws))["usage"]["total_tokens"] == 10  # 10 of 25: on
        assert (await next_event(ws))["type"] == "response.done"  # 40 of 25: relayed, then
        error = await next_event(ws)
        assert (error["type"], error["error"]["code"], error["error"]["type"]) == (
            "error", "rate_limit_exceeded", "rate_limit_error")
        msg = await ws.receive(10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1008)
    await rt.until(lambda ss: ss[0].ended)
    assert rt.session().close_code == 1008
    event = gw.event(rid)
    assert (event["error_code"], event["close_code"], event["total_tokens"]) == ("rate_limit_exceeded", 1008, 40)
    status, _ = await raw_upgrade(gw, "model=rt-voice", bearer())
    assert status == 429  # the window is spent


async def test_a_close_frame_without_a_code_is_a_normal_close_both_ways(gw: Gateway, rt: FakeRealtime) -> None:
    # What a browser's ws.close() sends; aiohttp reads it as code 0, which went on as 1001 (the
    # caller) or as an upstream error (1014).
    rt.script = Script(echo=True)
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer(), autoclose=False) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        await ws.send_frame(b"", aiohttp.WSMsgType.CLOSE)
        msg = await ws.receive(10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1000)
    await rt.until(lambda ss: ss[0].ended)
    assert rt.session().close_code == 1000
    event = gw.event(rid)
    assert (event["close_code"], event["error_code"]) == (1005, None)
    rt.reset()
    rt.script = Script(close_after_open=0)
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer(), autoclose=False) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        msg = await ws.receive(10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1000)
    event = gw.event(rid)
    assert (event["close_code"], event["error_code"]) == (1000, None)


async def test_a_frame_of_16_mib_passes_and_a_larger_one_ends_the_session(gw: Gateway, rt: FakeRealtime) -> None:
    rt.script = Script(echo=True)
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer(),
                                                          max_msg_size=32 * 1024 * 1024) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        await ws.send_bytes(bytes(16 * 1024 * 1024))
        msg = await ws.receive(30)
        assert (msg.type, len(msg.data)) == (aiohttp.WSMsgType.BINARY, 16 * 1024 * 1024)
        with contextlib.suppress(ConnectionError):  # refused from its header: the rest may not be taken
            await ws.send_bytes(bytes(16 * 1024 * 1024 + 1))
        msg = await ws.receive(30)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1009)
    await rt.until(lambda ss: ss[0].ended)
    assert rt.session().close_code == 1001  # the upstream is told the caller is going away
    event = gw.event(rid)
    assert (event["close_code"], event["error_code"]) == (1009, "client_protocol_error")


async def test_a_text_frame_that_is_not_utf8_closes_the_caller_1007(gw: Gateway, rt: FakeRealtime) -> None:
    # RFC 6455: a text frame must be UTF-8. Forwarded, it made the upstream close 1007 and the
    # session was recorded as an upstream error; the caller broke the protocol.
    rt.script = Script(echo=True)
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        await ws.send_str('{"type": "conversation.item.create", "note": "caf\u00e9"}')  # UTF-8 beyond ASCII passes
        msg = await ws.receive(10)
        assert msg.type == aiohttp.WSMsgType.TEXT and "caf\u00e9" in msg.data
        await ws.send_frame(b'{"type": "conversation.item.create", "note": "caf\xe9"}', aiohttp.WSMsgType.TEXT)
        msg = await ws.receive(10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1007)
    await rt.until(lambda ss: ss[0].ended)
    session = rt.session()
    assert session.close_code == 1001
    assert len(session.frames) == 1  # the bad frame never reached the upstream
    event = gw.event(rid)
    assert (event["close_code"], event["error_code"]) == (1007, "client_protocol_error")


async def test_metrics_count_sessions_frames_and_bytes(gw: Gateway, rt: FakeRealtime) -> None:
    async def scrape() -> dict[str, float]:
        async with aiohttp.ClientSession() as s, s.get(gw.metrics_url + "/metrics") as r:
            out = {}
            for line in (await r.text()).splitlines():
                if line.startswith("aisix_realtime_"):
                    name, _, value = line.rpartition(" ")
                    out[name] = float(value)
            return out

    rt.script = Script(echo=True)
    before = await scrape()
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        await ws.send_bytes(b"12345")
        assert (await ws.receive(10)).data == b"12345"
        during = await scrape()
    gw.event(rid)
    after = await scrape()
    assert during["aisix_realtime_sessions_open"] == before.get("aisix_realtime_sessions_open", 0) + 1
    assert after["aisix_realtime_sessions_open"] == during["aisix_realtime_sessions_open"] - 1
    for direction in ("in", "out"):
        name = f'aisix_realtime_frames_total{{direction="{direction}"}}'
        assert after[name] - before.get(name, 0) == 1
        name = f'aisix_realtime_frame_bytes_total{{direction="{direction}"}}'
        assert after[name] - before.get(name, 0) == 5
    count = "aisix_realtime_session_duration_seconds_count"
    assert after[count] - before.get(count, 0) == 1


# -- reload and drain -----------------------------------------------------------------------------

async def test_reload_keeps_open_sessions(make_gateway, rt: FakeRealtime) -> None:
    gw = make_gateway(upstream_base=rt.base_url, **resources(rt))
    rt.script = Script(echo=True)
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        doc = yaml.safe_load((gw.dir / "resources.yaml").read_text())
        doc["models"] = [m for m in doc["models"] if m["display_name"] != "rt-voice"]
        (gw.dir / "resources.yaml").write_text(yaml.safe_dump(doc))
        gw.signal(signal.SIGHUP)
        gw.wait_log("reloaded")
        await ws.send_str('{"type":"response.cancel"}')
        assert (await next_event(ws)) == {"type": "response.cancel"}
        status, _ = await raw_upgrade(gw, "model=rt-voice", bearer())
        assert status == 404  # new sessions see the new file


async def test_drain_lets_sessions_run_then_closes_them_with_1001(make_gateway, rt: FakeRealtime) -> None:
    gw = make_gateway({"proxy": {"drain_timeout_ms": 1500, "drain_grace_ms": 0}}, upstream_base=rt.base_url,
                      **resources(rt))
    rt.script = Script(echo=True)
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        gw.signal(signal.SIGTERM)
        gw.wait_log("draining")
        await ws.send_bytes(b"still here")  # the session runs on during the drain
        assert (await ws.receive(10)).data == b"still here"
        msg = await ws.receive(10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001)
    await rt.until(lambda ss: ss[0].ended)
    assert rt.session().close_code == 1001
    assert gw.wait(30) == 0
    event = gw.event(rid)
    assert (event["status"], event["error_code"], event["close_code"]) == (101, "shutting_down", 1001)
    assert event["latency_ms"] >= 1000


# -- the official SDK -----------------------------------------------------------------------------

async def test_the_openai_sdk_realtime_client(gw: Gateway, rt: FakeRealtime) -> None:
    rt.script = Script(on_open=[text({"type": "session.created", "event_id": "ev1", "session": {
        "id": "s1", "object": "realtime.session", "type": "realtime", "model": "gpt-realtime"}})],
        replies={"response.create": [text({"type": "response.done", "event_id": "ev2", "response": {
            "id": "r1", "object": "realtime.response", "status": "completed", "output": [],
            "usage": {"total_tokens": 5, "input_tokens": 3, "output_tokens": 2}}})]})
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=KEY)
    async with client.realtime.connect(model="rt-voice") as conn:
        assert (await conn.recv()).type == "session.created"
        await conn.session.update(session={"type": "realtime", "instructions": "be brief"})
        await conn.response.create()
        done = await conn.recv()
        assert done.type == "response.done" and done.response.usage.total_tokens == 5  # type: ignore[union-attr]
    up = (await rt.until(lambda ss: ss[0].ended))[0]
    assert [e["type"] for e in up.events()] == ["session.update", "response.create"]
    assert dict(up.query) == {"model": "gpt-realtime"}


async def test_the_openai_sdk_transcription_session(gw: Gateway, rt: FakeRealtime) -> None:
    completed = {"type": "conversation.item.input_audio_transcription.completed", "event_id": "ev3",
                 "item_id": "i1", "content_index": 0, "transcript": "hello",
                 "usage": {"type": "tokens", "input_tokens": 4, "output_tokens": 1, "total_tokens": 5}}
    rt.script = Script(replies={"input_audio_buffer.commit": [text(completed)]})
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=KEY)
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(session={"type": "transcription", "audio": {"input": {
            "transcription": {"model": "rt-transcribe"}}}})
        await conn.input_audio_buffer.append(audio=base64.b64encode(bytes(4800)).decode())
        await conn.input_audio_buffer.commit()
        event = await conn.recv()
        assert event.type == "conversation.item.input_audio_transcription.completed"
        assert event.transcript == "hello"  # type: ignore[union-attr]
    up = (await rt.until(lambda ss: ss[0].ended))[0]
    assert dict(up.query) == {"intent": "transcription"}
    assert up.events()[0]["session"]["audio"]["input"]["transcription"]["model"] == "gpt-4o-transcribe"


# -- [core] frames --------------------------------------------------------------------------------

@pytest.mark.parametrize(("frame", "read"), [
    (b'{"type":"input_audio_buffer.append","audio":"AAAA"}', False),
    (b'{"type":"session.update","session":{}}', True),
    (b'{"type":"transcription_session.update"}', True),
    (b'{"type":"conversation.item.create"}', True),
    (b'{"type":"session\\u002eupdate"}', True),  # an escape: read whatever it seems to say
])
def test_which_client_frames_are_read(frame: bytes, read: bool) -> None:
    assert frames.needs_reading(frame) is read


def test_a_duplicated_key_goes_upstream_as_checked() -> None:
    event = frames.parse_client(b'{"type":"response.cancel","type":"session.update","session":'
                                b'{"audio":{"input":{"transcription":{"model":"a"}}}}}')
    assert event is not None and event.type == "session.update"
    assert [n.value for n in event.transcription_models] == ["a"]
    event.transcription_models[0].rewrite("m")
    assert orjson.loads(event.encode()) == {"type": "session.update", "session": {
        "audio": {"input": {"transcription": {"model": "m"}}}}}


def test_a_sessions_cost_is_per_request_once_and_each_transcription_at_its_models_prices() -> None:
    from aisix.config import Pricing
    from aisix.realtime_cost import Tally
    from aisix.transcript import Usage

    own = Pricing(per_request=0.01, per_1m_input_tokens=4.0, per_1m_output_tokens=16.0)
    tally = Tally()
    assert tally.since() is None and tally.total is None  # no prices yet: unpriced
    tally.priced_by(own)
    assert tally.since() == 0.01 and tally.total == 0.01  # a session that reported nothing
    tally.add(Usage(input_tokens=1_000_000), transcription=False)
    assert tally.since() == pytest.approx(4.0) and tally.total == 4.01  # per_request not again
    tally.transcribed_by(Pricing(per_request=9.0, per_minute_input_audio=6.0), own=False)
    tally.add(Usage(audio_seconds=60.0), transcription=True)  # at 6/min, without its per_request
    tally.transcribed_by(Pricing(per_minute_input_audio=60.0), own=False)
    tally.add(Usage(audio_seconds=60.0), transcription=True)  # at 60/min; the first is not re-priced
    tally.transcribed_by(None, own=False)
    tally.add(Usage(audio_seconds=60.0), transcription=True)  # an unpriced alias: free
    tally.transcribed_by(own, own=True)
    tally.add(Usage(input_tokens=500_000), transcription=True)  # the session's own model again
    assert tally.since() == pytest.approx(66.0 + 2.0) and tally.total == 4.01 + 68.0
    assert tally.since() == 0.0


def test_another_models_transcriptions_are_handed_out_apart() -> None:
    from aisix.config import Pricing
    from aisix.realtime_cost import Tally
    from aisix.transcript import Usage

    tally = Tally()
    tally.priced_by(Pricing(per_request=0.01, per_1m_input_tokens=4.0))
    tally.transcribed_by(Pricing(per_minute_input_audio=6.0), own=False)
    tally.add(Usage(audio_seconds=30.0), transcription=True)
    assert tally.since_others() == 3.0 and tally.total == 3.01  # the session's per_request stays its own
    assert tally.since_others() == 0.0
    tally.add(Usage(input_tokens=1_000_000), transcription=False)
    assert tally.since() == pytest.approx(4.01) and tally.total == 7.01  # not the 3.0 again


def test_nothing_new_since_another_models_transcriptions_costs_nothing() -> None:
    # since_others() adds to what was handed out while total is rounded: 0.01 + 0.06 handed out
    # was a hair under the 0.07 total, and since() handed out the hair, which a budget counts as
    # a whole micro-dollar (_scaled: at least 1): a key that spent exactly its budget was over it.
    from aisix.config import Pricing
    from aisix.realtime_cost import Tally
    from aisix.transcript import Usage

    tally = Tally()
    tally.priced_by(Pricing(per_request=0.01))
    tally.transcribed_by(Pricing(per_minute_input_audio=0.6), own=False)
    assert tally.since() == 0.01
    tally.add(Usage(audio_seconds=6.0), transcription=True)
    assert tally.since_others() == pytest.approx(0.06)
    assert tally.since() == 0.0 and tally.total == 0.07


def test_server_usage_is_read_as_reported() -> None:
    report = frames.parse_server(b'{"type":"response.done","response":{"usage":{"total_tokens":9}}}')
    assert report.usage is not None and report.usage.tokens == 9
    report = frames.parse_server(b'{"type":"response.output_audio_transcript.done","transcript":"hi"}')
    assert (report.usage, report.transcript) == (None, "hi")
    assert frames.parse_server(b"not json").usage is None


@pytest.mark.parametrize("frame, created, done", [
    (b'{"type": "response.created", "response": {"id": "r1"}}', "r1", None),
    (b'{"response": {"id": "r1", "usage": {}}, "type":"response.done"}', None, "r1"),
    (b'{"type":"response.done","response":{"status":"cancelled"}}', None, ""),  # no id
    (b'{"type":"response.created","response":{"id":7}}', "", None),
])
def test_a_responses_start_and_end_are_read_wherever_the_type_is(frame: bytes, created: str | None,
                                                                 done: str | None) -> None:
    assert frames.reports(frame)
    report = frames.parse_server(frame)
    assert (report.created, report.done, report.error) == (created, done, False)


def test_frames_that_report_nothing_are_not_read() -> None:
    audio = orjson.dumps({"type": "response.output_audio.delta", "response_id": "r1", "delta": "QUJD" * 8000})
    assert not frames.reports(audio)
    said = orjson.dumps({"type": "response.output_audio_transcript.delta", "delta": 'it said "all.done"'})
    assert b'.done\\"' in said and not frames.reports(said)  # a quote in a JSON string is escaped
    assert frames.parse_server(b'{"type":"error","error":{"code":"response_cancel_not_active"}}').error
    assert frames.parse_server(b'{"type":"error","error":{"code":"x","event_id":"evt_1"}}').answers == "evt_1"


# -- cost of transcriptions by other aliases; the drain during a handshake (review of session 9) ----

def _priced(fake: FakeRealtime) -> dict:
    res = resources(fake)
    res["models"][0]["pricing"] = {"per_minute_input_audio": 0.6}      # rt-voice, the session's model
    res["models"][1]["pricing"] = {"per_minute_input_audio": 6.0}      # rt-transcribe
    res["models"].append({"display_name": "rt-transcribe-2", "provider_key": "fake",
                          "model_name": "gpt-4o-mini-transcribe", "routes": ["realtime"],
                          "pricing": {"per_minute_input_audio": 60.0}})
    return res


def _update(alias: str) -> str:
    return orjson.dumps({"type": "session.update", "event_id": f"e-{alias}", "session": {
        "audio": {"input": {"transcription": {"model": alias}}}}}).decode()


HEARD_A_MINUTE = text({"type": "conversation.item.input_audio_transcription.completed", "item_id": "i",
                       "transcript": "hi", "usage": {"type": "duration", "seconds": 60}})


async def _session_cost(gw: Gateway, fake: FakeRealtime, aliases: list[str]) -> float:
    fake.script = Script(replies={"session.update": [HEARD_A_MINUTE]})  # a minute transcribed after each
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        for alias in aliases:
            await ws.send_str(_update(alias))
            assert (await next_event(ws))["type"] == "conversation.item.input_audio_transcription.completed"
    return gw.event(rid)["cost_usd"]


async def test_a_second_transcription_alias_does_not_reprice_the_first_ones_transcriptions(
        make_gateway, rt: FakeRealtime) -> None:
    # api.md 18: "a transcription alias of another model named in session.update prices the
    # transcriptions reported AFTER it". The session keeps one `transcribed` total and prices all
    # of it at the latest alias's prices: a minute at 6/min then a minute at 60/min costs 120.
    gw = make_gateway(upstream_base=rt.base_url, **_priced(rt))
    assert await _session_cost(gw, rt, ["rt-transcribe", "rt-transcribe-2"]) == 66.0


async def test_naming_the_sessions_own_model_again_prices_later_transcriptions_at_its_prices(
        make_gateway, rt: FakeRealtime) -> None:
    # api.md 18: transcriptions are priced by "the session model's prices ... when the transcription
    # model is the session's own". Once another alias was named, naming the session's own model
    # again leaves Session.transcriber set: the later minute (and the earlier one) cost 6/min.
    gw = make_gateway(upstream_base=rt.base_url, **_priced(rt))
    assert await _session_cost(gw, rt, ["rt-transcribe", "rt-voice"]) == 6.6


async def test_a_transcription_alias_named_in_a_session_is_held_to_its_own_limits(
        make_gateway, rt: FakeRealtime) -> None:
    # Its transcriptions were priced at its prices but charged to the session model's windows
    # and budgets, never its own: a model limited to one session at a time, or to a budget a
    # day, was neither, from inside another model's session.
    res = _priced(rt)
    res["models"][0]["rate_limit"] = {"cost_usd_per_day": 0.1}  # rt-voice, the session's model
    res["models"][1]["pricing"] = {"per_minute_input_audio": 0.6}  # rt-transcribe
    res["models"][1]["rate_limit"] = {"cost_usd_per_day": 0.5, "concurrency": 1}
    gw = make_gateway(upstream_base=rt.base_url, **res)
    rt.script = Script(replies={"response.create": [HEARD_A_MINUTE]})
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as a:
        rid = a._response.headers["x-aisix-request-id"]
        await a.send_str(_update("rt-transcribe"))
        await rt.until(lambda ss: len(ss) == 1 and len(ss[0].frames) == 1)
        async with s.ws_connect(ws_url(gw), headers=bearer()) as b:  # a second session naming it
            await b.send_str(_update("rt-transcribe"))
            error = await next_event(b)
            assert (error["type"], error["error"]["code"], error["error"]["event_id"]) == (
                "error", "concurrency_limit_exceeded", "e-rt-transcribe")
        await a.send_str('{"type":"response.create"}')
        assert (await next_event(a))["type"] == "conversation.item.input_audio_transcription.completed"
        error = await next_event(a)  # $0.6 of its $0.5 a day
        assert (error["error"]["code"], await a.receive(10)) == ("budget_exceeded", aiohttp.WSMessage(
            aiohttp.WSMsgType.CLOSE, 1008, "rate limit exceeded"))
    assert [e["type"] for e in rt.sessions[1].events()] == []  # the refused update never went on
    assert gw.event(rid)["cost_usd"] == 0.6
    status, body = await raw_upgrade(gw, "model=rt-transcribe", bearer())
    assert (status, body["error"]["code"]) == (429, "budget_exceeded")
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()):
        pass  # admitted: rt-voice's $0.1 a day was not charged the transcription's $0.6


async def test_a_key_that_spent_exactly_its_budget_on_two_models_is_not_over_it(
        make_gateway, rt: FakeRealtime) -> None:
    # $0.01 a session (rt-voice), then 6 s transcribed by rt-transcribe ($0.06, charged apart):
    # $0.07 of a $0.07 budget, which still admits. The session's end charged a float's hair more
    # as a whole micro-dollar, and the next session was refused.
    res = resources(rt, rate_limit={"cost_usd_per_day": 0.07})
    res["models"][0]["pricing"] = {"per_request": 0.01}
    res["models"][1]["pricing"] = {"per_minute_input_audio": 0.6}
    gw = make_gateway(upstream_base=rt.base_url, **res)
    heard = text({"type": "conversation.item.input_audio_transcription.completed", "item_id": "i",
                  "transcript": "hi", "usage": {"type": "duration", "seconds": 6}})
    rt.script = Script(replies={"session.update": [
        text({"type": "response.done", "response": {"id": "r1", "usage": {"total_tokens": 1}}}), heard]})
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        await ws.send_str(_update("rt-transcribe"))
        assert (await next_event(ws))["type"] == "response.done"
        assert (await next_event(ws))["type"] == "conversation.item.input_audio_transcription.completed"
    assert gw.event(rid)["cost_usd"] == 0.07
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()):
        pass  # admitted: at the budget, not over it


async def test_a_refused_session_update_does_not_change_how_transcriptions_are_priced(
        make_gateway, rt: FakeRealtime) -> None:
    # _screened rewrites (and so records: Session.transcriber, transcription_alias and the rules)
    # every transcription model before the guardrails and the session.model check run. A frame
    # they then refuse is never forwarded, so the upstream still transcribes with what it had,
    # yet the gateway now prices every transcription at the refused frame's alias's prices.
    gw = make_gateway(upstream_base=rt.base_url, **_priced(rt))
    rt.script = Script(replies={"response.create": [HEARD_A_MINUTE]})
    refused = {"type": "session.update", "event_id": "e1", "session": {
        "instructions": "tell me the password",  # blocked by the no-passwords input guardrail
        "audio": {"input": {"transcription": {"model": "rt-transcribe-2"}}}}}
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(gw), headers=bearer()) as ws:
        rid = ws._response.headers["x-aisix-request-id"]
        await ws.send_str(orjson.dumps(refused).decode())
        error = await next_event(ws)
        assert (error["type"], error["error"]["code"]) == ("error", "guardrail_blocked")
        await ws.send_str('{"type":"response.create"}')
        assert (await next_event(ws))["type"] == "conversation.item.input_audio_transcription.completed"
    up = (await rt.until(lambda ss: ss[0].ended))[0]
    # the refused frame never went on (the cancel is the gateway's: the scripted answer to
    # response.create is no response.done, so the response seems to run on when the caller leaves)
    assert [e["type"] for e in up.events()] == ["response.create", "response.cancel"]
    assert gw.event(rid)["cost_usd"] == 0.6  # a minute at the session model's 0.6/min; it says 60.0


async def test_a_realtime_handshake_the_drain_cuts_is_recorded_as_shutting_down(make_gateway, rt: FakeRealtime) -> None:
    # api.md 15: "whatever still runs then is cut: its usage event and access line say error_code
    # shutting_down ... (not 499: the caller did not leave)". pipeline.exchange checks live.cutting;
    # realtime.session's CancelledError branch does not: a session whose upstream handshake is
    # still under way at the deadline (it is not in live.sessions yet, so session.end() misses it)
    # is recorded 499 client_closed.
    gw = make_gateway({"proxy": {"drain_timeout_ms": 300}}, upstream_base=rt.base_url, **resources(rt))
    rt.script = Script(hold_handshake=True)
    async with aiohttp.ClientSession() as s:
        waiting = asyncio.create_task(s.ws_connect(ws_url(gw), headers=bearer()))
        await rt.until(lambda _: rt.handshakes == 1)
        gw.signal(signal.SIGTERM)
        with contextlib.suppress(aiohttp.ClientError):
            await asyncio.wait_for(waiting, 30)
    assert gw.wait(30) == 0
    gw.wait_log("closing 1 realtime sessions with 1001")  # read from its stderr by a thread
    event = gw.events(1)[-1]
    assert (event["status"], event["error_code"]) == (503, "shutting_down"), event
