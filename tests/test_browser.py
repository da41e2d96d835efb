"""A web page on another origin calls the gateway from a real headless Chromium (tests/browser.py):
the browser makes its own preflights and enforces the answers, so what passes here works in a
voice web app. The page is tests/voice_page.html, served from its own port; plain-HTTP checks of
the same headers are in test_cors.py.

Realtime sessions from the page key their WebSocket as a browser must (the subprotocols
``realtime`` and ``openai-insecure-api-key.<key>``) and end the ways a page does: ``ws.close()``,
``ws.close(1000, "bye")``, or the tab going away (closed, or navigated elsewhere), for which
Chromium sends a close frame of 1001 and drops the connection at once. Plain-client checks of the
same route are in test_realtime.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from aisix.config import hash_key
from aisix.devupstream import MP3_FRAME
from tests.browser import Chromium, PageServer
from tests.fake_realtime import FakeRealtime, Script, text
from tests.fakes import Behaviour, FakeUpstream
from tests.gateway import TEAM_A, Gateway

LIMITED = "sk-browser-limited-secret"  # one speech request a day: the next one is a 429
KEY = "sk-browser-rt-secret"
USAGE = {"total_tokens": 31, "input_tokens": 20, "output_tokens": 11}


@pytest.fixture(scope="module")
def page() -> Iterator[PageServer]:
    server = PageServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stranger() -> Iterator[PageServer]:
    """The same page from an origin the gateway does not list."""
    server = PageServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    browser = Chromium().start()
    yield browser
    browser.stop()


@pytest.fixture(scope="module")
def cors_gateway(fake: FakeUpstream, page: PageServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    limited = {"display_name": "limited", "key_hash": hash_key(LIMITED), "allowed_models": ["tts-*"],
               "rate_limit": {"rpd": 1}}
    gw = Gateway(tmp_path_factory.mktemp("cors"), fake.base_url,
                 {"proxy": {"cors": {"allowed_origins": [page.origin]}}}, api_keys=[limited]).start()
    yield gw
    gw.stop()


def js(function: str, *args: object) -> str:
    return f"aisix.{function}({', '.join(json.dumps(a) for a in args)})"


async def test_speech_streams_into_an_audio_element(chromium: Chromium, page: PageServer, cors_gateway: Gateway,
                                                    fake: FakeUpstream) -> None:
    fake.behaviour = Behaviour(chunk_delay=0.2)
    async with chromium.tab(page.origin + "/") as tab:
        out = await tab.run(js("speech", cors_gateway.url, TEAM_A))
    assert out["status"] == 200 and out["contentType"] == "audio/mpeg"
    assert out["requestId"]  # exposed: the page can quote it
    assert out["bytes"] == 3 * 4800 and out["firstBytes"] == list(MP3_FRAME[:4])
    # read as it streamed: the first chunk was in the page while the upstream still sent the rest
    assert out["chunks"] >= 3 and out["lastChunkMs"] - out["firstChunkMs"] >= 300
    assert out["duration"] > 0.5 and out["played"] > 0.5  # the <audio> element decoded and played it
    assert json.loads(fake.wait_received()[0].body)["model"] == "gpt-4o-mini-tts"


@pytest.mark.parametrize("order", ["model-first", "file-first"])
async def test_formdata_uploads_in_either_order(chromium: Chromium, page: PageServer, cors_gateway: Gateway,
                                                fake: FakeUpstream, order: str) -> None:
    async with chromium.tab(page.origin + "/") as tab:
        out = await tab.run(js("transcribe", cors_gateway.url, TEAM_A, order))
    assert out["status"] == 200 and out["body"]["text"] == "hello from the fake"
    assert out["requestId"]
    body = fake.wait_received()[0].body
    model, file = body.find(b'name="model"\r\n\r\nwhisper-1\r\n'), body.find(b'filename="speech.wav"')
    assert model > 0 and file > 0 and (model < file) == (order == "model-first")
    assert b"RIFF" in body and b"WAVEfmt " in body


async def test_errors_are_readable_by_the_page(chromium: Chromium, page: PageServer, cors_gateway: Gateway) -> None:
    async with chromium.tab(page.origin + "/") as tab:
        unauthorized = await tab.run(js("call", cors_gateway.url, "sk-wrong", "/v1/models"))
        missing = await tab.run(js("call", cors_gateway.url, TEAM_A, "/v1/audio/speech", {
            "method": "POST", "headers": {"Content-Type": "application/json"},
            "body": json.dumps({"model": "no-such-model", "input": "hi"})}))
        limited = [await tab.run(js("speech", cors_gateway.url, LIMITED)) for _ in range(3)]
    assert unauthorized["status"] == 401 and unauthorized["body"]["error"]["code"] == "invalid_api_key"
    assert unauthorized["requestId"]
    assert missing["status"] == 404 and missing["body"]["error"]["code"] == "model_not_found" and missing["requestId"]
    # rpd 1: of three requests at least one is refused, whatever the day boundary does
    refused = next(r for r in limited if r["status"] == 429)
    assert refused["error"]["error"]["code"] == "rate_limit_exceeded" and refused["requestId"]
    assert int(refused["retryAfter"]) > 0 and refused["ratelimit"]["reset"] == refused["retryAfter"]
    assert refused["ratelimit"]["limit"] == "1" and refused["ratelimit"]["remaining"] == "0"


async def test_a_page_from_another_origin_is_refused(chromium: Chromium, stranger: PageServer,
                                                     cors_gateway: Gateway) -> None:
    def asked() -> int:
        return sum('"GET /v1/models"' in line for line in cors_gateway.lines)

    # The access log is written up to a second late: the lines of the tests before this one are
    # in once this request's own line is (it is written after theirs).
    async with aiohttp.ClientSession() as s, s.get(cors_gateway.url + "/v1/models", headers={
            "Authorization": f"Bearer {TEAM_A}", "x-aisix-request-id": "before-the-stranger"}) as r:
        assert r.status == 200
    cors_gateway.wait_log("rid=before-the-stranger")
    before = asked()
    async with chromium.tab(stranger.origin + "/") as tab:
        out = await tab.run(js("refused", cors_gateway.url, TEAM_A))
        why = await tab.wait_console("CORS policy")
    assert out == "TypeError: Failed to fetch"
    assert stranger.origin in why and "preflight" in why, why
    # the browser asked, was refused, and never sent the request itself
    cors_gateway.wait_log('"OPTIONS /v1/models" 403')
    assert asked() == before


# -- answers made before any route ---------------------------------------------------------------


@pytest.fixture(scope="module")
def anyone(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("cors-any"), fake.base_url, {"proxy": {"cors": {"allowed_origins": ["*"]}}})
    gw.start()
    yield gw
    gw.stop()


async def test_a_request_the_parser_refuses_is_readable_by_the_page(chromium: Chromium, page: PageServer,
                                                                     anyone: Gateway) -> None:
    async with chromium.tab(page.origin + "/") as tab:
        # no key, no custom header: a simple GET, so no preflight: the page gets the answer itself;
        # its request line is over aiohttp's 8190 bytes
        out = await tab.run(f"aisix.call({anyone.url!r}, '', '/v1/models/' + 'a'.repeat(9000))")
    assert out["status"] == 400 and out["body"]["error"]["code"] == "invalid_http_request"
    assert out["requestId"] and out["sdkRequestId"] == out["requestId"]  # exposed, as on every answer
    anyone.wait_log(f"rid={out['requestId']}")


# -- realtime sessions from a page --------------------------------------------------------------


@pytest.fixture(autouse=True)
def _scripted(rt: FakeRealtime) -> None:
    rt.reset()
    rt.script = Script(on_open=[text({"type": "session.created", "session": {"id": "sess_1"}})],
                       replies={"response.create": [text({"type": "response.done", "response": {"usage": USAGE}})]})


@pytest.fixture(scope="module")
def gw(rt: FakeRealtime, page: PageServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    cors = {"proxy": {"cors": {"allowed_origins": [page.origin]}}}
    g = Gateway(tmp_path_factory.mktemp("browser-rt"), rt.base_url, cors,
                models=[{"display_name": "rt-voice", "provider_key": "fake", "model_name": "gpt-realtime",
                         "routes": ["realtime"]}],
                api_keys=[{"display_name": "web", "key_hash": hash_key(KEY), "allowed_models": ["rt-*"]}]).start()
    yield g
    g.stop()


def realtime_events(gw: Gateway, n: int) -> list[dict[str, Any]]:
    """The first n realtime usage events, once written (the page cannot read a session's request id)."""
    while True:
        written = gw.events(0)
        found = [e for e in written if e["route"] == "realtime"]
        if len(found) >= n:
            return found
        gw.events(len(written) + 1)  # the next event, whatever it is (bounded by its timeout)


@pytest.mark.parametrize(("how", "code"), [
    ("ws.close()", 1005),          # a close frame without a code: recorded as 1005, goes on as 1000
    ("ws.close(1000, 'bye')", 1000),
    ("the tab is closed", 1001),   # Chromium's close frame for a page going away: 1001
    ("the tab navigates away", 1001),
])
async def test_a_page_ends_its_session_and_the_record_says_how(chromium: Chromium, page: PageServer, gw: Gateway,
                                                               rt: FakeRealtime, how: str, code: int) -> None:
    before = len(realtime_events(gw, 0))
    async with chromium.tab(page.origin + "/") as tab:
        opened = await tab.run(js("converse", gw.url, KEY, "rt-voice"))
        assert opened == {"protocol": "realtime", "first": "session.created"}
        # the page's three frames reached the upstream (so the response.done with usage came back)
        await rt.until(lambda ss: len(ss) == 1 and len(ss[0].frames) == 3)
        assert [e["type"] for e in rt.session().events()] == ["session.update", "input_audio_buffer.append",
                                                               "response.create"]
        if how == "ws.close()":
            closed = await tab.run(js("hangUp"))
            assert closed == {"code": 1000, "reason": "", "clean": True}  # the gateway's answer to a bare close
        elif how == "ws.close(1000, 'bye')":
            closed = await tab.run(js("hangUp", 1000, "bye"))
            assert closed == {"code": 1000, "reason": "bye", "clean": True}
        elif how == "the tab navigates away":
            await tab.call("Page.navigate", url="about:blank")
        # else: leaving the block closes the tab
    await rt.until(lambda ss: ss[0].ended)
    assert rt.session().close_code == (1000 if code == 1005 else code)  # relayed to the upstream
    event = realtime_events(gw, before + 1)[before]
    assert event["status"] == 101 and event["api_key"] == "web" and event["model"] == "rt-voice"
    assert (event.get("close_code"), event.get("error_code")) == (code, None), event
    assert (event["input_tokens"], event["output_tokens"], event["total_tokens"]) == (20, 11, 31)
    line = gw.wait_log(f"rid={event['request_id']}")
    assert '"GET /v1/realtime" 101' in line and "key=web model=rt-voice" in line
    assert KEY not in gw.log() and KEY not in gw.usage_file.read_text()


async def test_a_page_from_an_origin_not_listed_cannot_open_a_session(chromium: Chromium, stranger: PageServer,
                                                                      gw: Gateway, rt: FakeRealtime) -> None:
    # A WebSocket has no preflight: the browser sends its Origin and leaves the choice to the server.
    # proxy.cors lists the origins whose pages may spend a key (docs/operations.md, "Browsers":
    # "list origins unless the key is meant for anyone"); a page elsewhere holding the key is
    # refused its session as its fetch() calls are, before any upstream session is opened.
    before = len(realtime_events(gw, 0))
    async with chromium.tab(stranger.origin + "/") as tab:
        out = await tab.run(f"{js('converse', gw.url, KEY, 'rt-voice')}.then(o => o, closed => ({{closed}}))")
        assert out == {"closed": {"code": 1006, "reason": "", "clean": False}}, out
        why = await tab.wait_console("WebSocket connection to")  # Chromium says why it failed
    assert "403" in why, why
    assert rt.handshakes == 0
    event = realtime_events(gw, before + 1)[before]
    assert (event["status"], event["error_code"]) == (403, "cors_origin_not_allowed")
