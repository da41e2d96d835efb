"""A web page on another origin calls the gateway from a real headless Chromium (tests/browser.py):
the browser makes its own preflights and enforces the answers, so what passes here works in a
voice web app. The page is tests/voice_page.html, served from its own port; plain-HTTP checks of
the same headers are in test_cors.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from aisix.config import hash_key
from aisix.devupstream import MP3_FRAME
from tests.browser import Chromium, PageServer
from tests.fakes import Behaviour, FakeUpstream
from tests.gateway import TEAM_A, Gateway

LIMITED = "sk-browser-limited-secret"  # one speech request a day: the next one is a 429


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

    before = asked()
    async with chromium.tab(stranger.origin + "/") as tab:
        out = await tab.run(js("refused", cors_gateway.url, TEAM_A))
        why = await tab.wait_console("CORS policy")
    assert out == "TypeError: Failed to fetch"
    assert stranger.origin in why and "preflight" in why, why
    # the browser asked, was refused, and never sent the request itself
    cors_gateway.wait_log('"OPTIONS /v1/models" 403')
    assert asked() == before

