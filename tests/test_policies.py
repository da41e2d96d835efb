"""Rate limits and guardrails end to end: real gateway processes, the fake upstream, redis-server."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from aisix import config, connection
from aisix.access_log import AccessLogger, Writer
from aisix.background import Background
from aisix.app import create_app
from aisix.config import hash_key
from tests.fakes import Behaviour, CannedUpstream, FakeUpstream
from tests.gateway import TEAM_A, Gateway
from tests.test_transcriptions import form, no_complete_request_reached

SPEECH = {"model": "tts-prod", "input": "Hello there", "voice": "alloy"}


def limited_key(secret: str, **rate: int) -> dict[str, Any]:
    # A fresh name per test: Redis counters outlive a test, names keep them apart.
    return {"display_name": f"lim-{uuid.uuid4().hex[:8]}", "key_hash": hash_key(secret),
            "allowed_models": ["*"], "rate_limit": rate}


async def post(gw: Gateway, key: str, path: str = "/v1/audio/speech", **kw: Any) -> tuple[int, dict, bytes]:
    kw.setdefault("json", SPEECH)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + path, headers={"Authorization": f"Bearer {key}", **kw.pop("headers", {})},
                          **kw) as r:
            return r.status, dict(r.headers), await r.read()


async def test_request_window_admits_the_limit_then_429(make_gateway, fake: FakeUpstream) -> None:
    gw = make_gateway(api_keys=[limited_key("sk-lim", rpd=3)])
    statuses = [(await post(gw, "sk-lim"))[0] for _ in range(3)]
    status, headers, body = await post(gw, "sk-lim")
    assert statuses == [200] * 3 and status == 429
    assert b'"type":"rate_limit_error"' in body and b'"code":"rate_limit_exceeded"' in body
    assert headers["x-ratelimit-limit-requests"] == "3" and headers["x-ratelimit-remaining-requests"] == "0"
    assert 0 < int(headers["Retry-After"]) <= 86400
    assert headers["x-ratelimit-reset-requests"] == headers["Retry-After"]
    assert len(fake.received) == 3
    assert (await post(gw, TEAM_A))[0] == 200  # another key is not limited


async def test_model_limit_is_shared_by_every_key(make_gateway) -> None:
    gw = make_gateway(api_keys=[limited_key("sk-one"), limited_key("sk-two")],
                      models=[{"display_name": "tts-shared", "provider_key": "fake", "model_name": "m",
                               "rate_limit": {"rpd": 2}}])
    body = {**SPEECH, "model": "tts-shared"}
    got = [(await post(gw, k, json=body))[0] for k in ("sk-one", "sk-two", "sk-one", "sk-two")]
    assert got == [200, 200, 429, 429]


async def test_concurrency_slot_is_held_until_the_stream_ends(make_gateway, fake: FakeUpstream) -> None:
    gw = make_gateway(api_keys=[limited_key("sk-c1", concurrency=1)])
    fake.behaviour = Behaviour(speech_chunks=4, chunk_delay=0.3)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/speech", json=SPEECH, headers={"Authorization": "Bearer sk-c1"}) as r:
            await r.content.readany()  # the first stream is under way and holds the slot
            status, headers, body = await post(gw, "sk-c1")
            assert status == 429 and b"concurrency_limit_exceeded" in body
            assert headers["Retry-After"] == "1" and "x-ratelimit-limit-requests" not in headers
            await r.read()
    fake.behaviour = Behaviour()
    assert (await post(gw, "sk-c1"))[0] == 200


@pytest.mark.parametrize("failure", ["upstream-500", "client-leaves", "upstream-reset"])
async def test_concurrency_slot_is_released_on_every_path(make_gateway, fake: FakeUpstream, failure: str) -> None:
    gw = make_gateway(api_keys=[limited_key("sk-c2", concurrency=1)])
    if failure == "upstream-500":
        fake.behaviour = Behaviour(status=500)
        assert (await post(gw, "sk-c2"))[0] == 500
    elif failure == "upstream-reset":
        fake.behaviour = Behaviour(fail="reset_mid")
        with pytest.raises(aiohttp.ClientPayloadError):
            await post(gw, "sk-c2")
    else:
        fake.behaviour = Behaviour(speech_chunks=50, chunk_delay=0.1)
        rid = uuid.uuid4().hex
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/audio/speech", json=SPEECH,
                              headers={"Authorization": "Bearer sk-c2", "x-aisix-request-id": rid}) as r:
                await r.content.readany()
        assert gw.event(rid)["status"] == 499  # written after the slot was given back
    fake.behaviour = Behaviour()
    assert (await post(gw, "sk-c2"))[0] == 200


async def test_token_window_rejects_once_exceeded(make_gateway, fake: FakeUpstream) -> None:
    gw = make_gateway(api_keys=[limited_key("sk-tok", tpd=10)])
    body, ctype = form("model", "file")
    kw = {"json": None, "data": body, "headers": {"Content-Type": ctype}}
    rid_status = await post(gw, "sk-tok", "/v1/audio/transcriptions", **dict(kw))
    assert rid_status[0] == 200  # the fake reports 15 tokens: known only after this answer
    status, headers, _ = await post(gw, "sk-tok", "/v1/audio/transcriptions", **dict(kw))
    assert status == 429
    assert headers["x-ratelimit-limit-tokens"] == "10" and headers["x-ratelimit-remaining-tokens"] == "0"
    assert headers["x-ratelimit-reset-tokens"] == headers["Retry-After"]


class InProcess:
    """A gateway app served in this process (aiohttp's runner on 127.0.0.1:0), built by
    create_app with an injected clock: the way to put a burst where a test wants it in a
    clock-aligned rate-limit window, without waiting for the wall clock."""

    def __init__(self, tmp: Path, upstream_base: str, clock: Callable[[], float], settings: dict,
                 like_the_server: bool = False, **resources: Any) -> None:
        self._files = Gateway(tmp, upstream_base, settings, **resources)  # writes the config files only
        self._config = config.load(tmp / "config.yaml", {})
        self._clock = clock
        # The runner as `aisix serve` makes it (a caller's leaving cancels its handler; the access
        # log's lines, to a pipe nobody reads), rather than aiohttp's defaults.
        self._like_the_server = like_the_server
        self.usage_file = self._files.usage_file
        self.url = ""
        self._runner: web.AppRunner | None = None

    @property
    def app(self) -> web.Application:
        assert self._runner is not None
        return self._runner.app

    async def __aenter__(self) -> InProcess:
        app = create_app(self._config, clock=self._clock)
        if self._like_the_server:
            self._sink_r, self._sink_w = os.pipe()
            os.set_blocking(self._sink_w, False)
            sink = self._sink_w
            self._runner = connection.AppRunner(
                app, handler_cancellation=True, auto_decompress=False,
                access_log_class=AccessLogger.configured(False, Writer(Background("test-stderr", lambda: sink))),
                access_log=logging.getLogger("aisix.access"))
        else:
            self._runner = web.AppRunner(app, auto_decompress=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()  # flushes the usage queue
        if self._like_the_server:
            os.close(self._sink_w)
            os.close(self._sink_r)


async def test_two_gateways_share_one_redis_limit(fake: FakeUpstream, redis_url: str, tmp_path: Path) -> None:
    key = limited_key("sk-shared", rpm=7)
    settings = {"ratelimit": {"backend": redis_url}}
    # Both gateways' clocks read 5 s into a minute, then run on: the burst is inside one window.
    offset = (time.time() // 60 + 1) * 60 + 5 - time.time()

    def clock() -> float:
        return time.time() + offset

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with InProcess(tmp_path / "a", fake.base_url, clock, settings, api_keys=[key]) as a, \
            InProcess(tmp_path / "b", fake.base_url, clock, settings, api_keys=[key]) as b:
        results = await asyncio.gather(*(post(gw, "sk-shared") for gw in [a, b] * 10))  # type: ignore[arg-type]
    assert sorted(r[0] for r in results) == [200] * 7 + [429] * 13
    events = [orjson.loads(line) for gw in (a, b) for line in gw.usage_file.read_bytes().splitlines()]
    assert len(events) == 20 and sum(e["status"] == 200 for e in events) == 7
    assert all(e["api_key"] == key["display_name"] for e in events)


async def test_unreachable_redis_fails_open(make_gateway) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = make_gateway({"ratelimit": {"backend": f"redis://127.0.0.1:{port}/0"}},
                      api_keys=[limited_key("sk-open", rpd=1)])
    assert [(await post(gw, "sk-open"))[0] for _ in range(3)] == [200, 200, 200]
    gw.wait_log("admitting without checking limits")  # stderr is written by a thread


def rule(name: str, hook: str, mode: str, word: str) -> dict[str, Any]:
    return {"name": name, "kind": "keyword", "hook_point": hook, "enforcement_mode": mode,
            "patterns": [{"kind": "literal", "value": word}, {"kind": "regex", "value": r"\b\d{16}\b"}]}


GUARDRAILS = [rule("no-secrets", "input", "block", "password"), rule("watch-refunds", "input", "monitor", "refund"),
              rule("clean-output", "output", "block", "forbidden"), rule("note-output", "output", "monitor", "noted")]


@pytest.fixture
def guarded(make_gateway) -> Gateway:
    return make_gateway(guardrails=GUARDRAILS)


async def test_speech_input_block_and_monitor(guarded: Gateway, fake: FakeUpstream) -> None:
    rid = uuid.uuid4().hex
    status, _, body = await post(guarded, TEAM_A, json={**SPEECH, "input": "my PassWord is hunter2"},
                                 headers={"x-aisix-request-id": rid})
    assert status == 422
    assert b'"type":"content_filter"' in body and b'"code":"guardrail_blocked"' in body and b"no-secrets" in body
    assert b"hunter2" not in body and b"PassWord" not in body
    assert fake.received == []
    assert guarded.event(rid)["guardrail"] == {"name": "no-secrets", "action": "blocked"}

    rid = uuid.uuid4().hex
    status, _, _ = await post(guarded, TEAM_A, json={**SPEECH, "input": "a refund please"},
                              headers={"x-aisix-request-id": rid})
    assert status == 200
    assert guarded.event(rid)["guardrail"] == {"name": "watch-refunds", "action": "monitored"}


@pytest.mark.parametrize("key", ["instructions", "Instructions"])
async def test_speech_instructions_are_screened_as_the_input_is(guarded: Gateway, fake: FakeUpstream, key: str) -> None:
    """`instructions` steers what gpt-4o-mini-tts says, as a realtime session's `instructions`
    do (screened there): it was sent on unscreened, so a blocked word went around the guardrail
    in the one field next to `input`. A key that is `instructions` in another case is refused, as
    for `model` and `input` (readers that match keys without case take it for the field)."""
    rid = uuid.uuid4().hex
    status, _, body = await post(guarded, TEAM_A, json={**SPEECH, key: "first say: my PassWord is hunter2"},
                                 headers={"x-aisix-request-id": rid})
    assert fake.received == []
    if key == "instructions":
        assert status == 422 and b"no-secrets" in body and b"hunter2" not in body
        assert guarded.event(rid)["guardrail"] == {"name": "no-secrets", "action": "blocked"}
    else:
        assert status == 400 and b"invalid_json" in body


async def test_prompt_before_the_model_blocks_before_the_upstream(guarded: Gateway, fake: FakeUpstream) -> None:
    body, ctype = form(("prompt", b"card 1234567812345678"), "file", "model")
    status, _, out = await post(guarded, TEAM_A, "/v1/audio/transcriptions", json=None, data=body,
                                headers={"Content-Type": ctype})
    assert status == 422 and b"no-secrets" in out
    assert fake.received == []


async def test_prompt_after_the_file_aborts_the_upstream(guarded: Gateway, fake: FakeUpstream) -> None:
    body, ctype = form("model", "file", fields=[("prompt", b"my password")])

    async def slowly():
        for i in range(0, len(body), 16384):
            yield body[i:i + 16384]

    status, _, out = await post(guarded, TEAM_A, "/v1/audio/transcriptions", json=None, data=slowly(),
                                headers={"Content-Type": ctype})
    assert status == 422 and b"no-secrets" in out
    await no_complete_request_reached(guarded, fake)  # the file went up, never the whole request


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_output_block_holds_the_transcript(guarded: Gateway, fake: FakeUpstream, stream: bool) -> None:
    fake.behaviour = Behaviour(transcript="this is forbidden text")
    body, ctype = form("model", "file", fields=[("stream", b"true")] if stream else [])
    rid = uuid.uuid4().hex
    status, headers, out = await post(guarded, TEAM_A, "/v1/audio/transcriptions", json=None, data=body,
                                      headers={"Content-Type": ctype, "x-aisix-request-id": rid})
    assert status == 422 and b"clean-output" in out and b"forbidden" not in out
    e = guarded.event(rid)
    assert e["guardrail"] == {"name": "clean-output", "action": "blocked"} and e["status"] == 422
    assert e["total_tokens"] == 15  # the upstream did the work: its usage is still recorded


async def test_output_monitor_lets_the_answer_through(guarded: Gateway, fake: FakeUpstream) -> None:
    fake.behaviour = Behaviour(transcript="this is noted text")
    body, ctype = form("model", "file")
    rid = uuid.uuid4().hex
    status, _, out = await post(guarded, TEAM_A, "/v1/audio/transcriptions", json=None, data=body,
                                headers={"Content-Type": ctype, "x-aisix-request-id": rid})
    assert status == 200 and b"noted" in out
    assert guarded.event(rid)["guardrail"] == {"name": "note-output", "action": "monitored"}


async def test_audio_bytes_are_never_scanned(guarded: Gateway, fake: FakeUpstream) -> None:
    body, ctype = form("model", "file", file=b"password forbidden 1234567812345678")
    status, _, _ = await post(guarded, TEAM_A, "/v1/audio/transcriptions", json=None, data=body,
                              headers={"Content-Type": ctype})
    assert status == 200


class OctetSpeech(CannedUpstream):
    """Answers every request with 2 MiB of audio labelled application/octet-stream, as
    OpenAI-compatible TTS servers often label audio (a pcm answer, say)."""

    AUDIO = bytes(2 * 1024 * 1024)

    def __init__(self) -> None:
        super().__init__("application/octet-stream", self.AUDIO)


@pytest.fixture
def octet_speech() -> Iterator[OctetSpeech]:
    upstream = OctetSpeech()
    yield upstream
    upstream.stop()


async def test_speech_audio_is_not_held_by_an_output_guardrail(octet_speech: OctetSpeech, make_gateway: Any) -> None:
    # Output guardrails screen transcripts; "speech audio is never
    # screened". A speech answer whose Content-Type is not audio/* was held whole as a transcript
    # by any blocking output rule (models default to all), then refused 502 past 1 MiB.
    rule = {"name": "no-secrets", "kind": "keyword", "hook_point": "output", "enforcement_mode": "block",
            "patterns": [{"kind": "literal", "value": "password"}]}
    gw = make_gateway(upstream_base=octet_speech.base_url, guardrails=[rule])
    async with aiohttp.ClientSession() as s, s.post(
            gw.url + "/v1/audio/speech", headers={"Authorization": f"Bearer {TEAM_A}"},
            json={"model": "tts-prod", "input": "hi", "voice": "alloy", "response_format": "pcm"}) as r:
        body = await r.read()
        event = gw.event(r.headers["x-aisix-request-id"])
    assert r.status == 200, body[:200]
    assert r.headers["Content-Type"] == "application/octet-stream" and body == OctetSpeech.AUDIO
    assert event["status"] == 200 and "guardrail" not in event
    # Untyped, it is read as the format asked for: pcm, 24 kHz 16-bit mono.
    assert event["audio_seconds_out"] == round(len(OctetSpeech.AUDIO) / 48000, 3)


async def test_untyped_speech_audio_is_recorded_as_streamed(octet_speech: OctetSpeech, make_gateway: Any) -> None:
    # Read and relayed as speech audio (measured as it passes), so its event says stream: true, as
    # for audio/* (docs/api.md: "true when a 2xx answer was relayed as a stream (speech audio, SSE)").
    gw = make_gateway(upstream_base=octet_speech.base_url)
    async with aiohttp.ClientSession() as s, s.post(
            gw.url + "/v1/audio/speech", headers={"Authorization": f"Bearer {TEAM_A}"},
            json={"model": "tts-prod", "input": "hi", "voice": "alloy", "response_format": "pcm"}) as r:
        await r.read()
        event = gw.event(r.headers["x-aisix-request-id"])
    assert r.status == 200 and event["audio_seconds_out"] == round(len(OctetSpeech.AUDIO) / 48000, 3)
    assert event["stream"] is True, event
