"""POST /v1/audio/speech through a real gateway process to the fake upstream."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import orjson
import pytest

from aisix.devupstream import MP3_FRAME
from tests.fakes import Behaviour, FakeUpstream
from tests.gateway import PROVIDER_SECRET, TEAM_A, Gateway

AUTH = {"Authorization": f"Bearer {TEAM_A}"}
BODY = {"model": "tts-prod", "input": "Hello from AISIX.", "voice": "alloy", "speed": 1.25,
        "response_format": "mp3", "instructions": "cheerful, \u00e9l\u00e8ve", "extra": {"n": [1, 2.5, None, True]}}


async def post_speech(gw: Gateway, body: object = BODY, headers: dict | None = None) -> tuple[aiohttp.ClientResponse, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/speech", json=body, headers={**AUTH, **(headers or {})}) as r:
            return r, await r.read()


async def test_only_the_model_value_changes(gateway: Gateway, fake: FakeUpstream) -> None:
    r, audio = await post_speech(gateway)
    assert r.status == 200
    assert r.headers["Content-Type"] == "audio/mpeg"
    assert audio.startswith(MP3_FRAME[:4]) and len(audio) == 3 * 4800
    sent = json.loads(fake.wait_received()[0].body)
    assert list(sent.items()) == list({**BODY, "model": "gpt-4o-mini-tts"}.items())


async def test_outbound_headers_are_built_not_copied(gateway: Gateway, fake: FakeUpstream) -> None:
    r, _ = await post_speech(gateway, headers={
        "Cookie": "session=caller", "x-api-key": "caller-other-key", "Proxy-Authorization": "Basic x",
        "Connection": "keep-alive, x-hop", "x-hop": "1", "TE": "trailers", "x-aisix-request-id": "caller-id-1",
        "Accept": "audio/mpeg"})
    got = fake.wait_received()[0]
    assert got.path == "/v1/audio/speech"
    assert got.headers["Authorization"] == f"Bearer {PROVIDER_SECRET}"
    assert got.headers["Host"] == fake.base_url.split("/")[2]
    assert got.headers["x-aisix-request-id"] == "caller-id-1" == r.headers["x-aisix-request-id"]
    assert got.headers["Accept"] == "audio/mpeg"
    assert got.headers["Accept-Encoding"] == "identity"
    for name in ("Cookie", "x-api-key", "Proxy-Authorization", "x-hop", "TE"):
        assert name not in got.headers
    assert TEAM_A not in str(dict(got.headers))


async def test_answer_headers_relayed(gateway: Gateway, fake: FakeUpstream) -> None:
    fake.behaviour = Behaviour(content_length=True)
    r, audio = await post_speech(gateway)
    assert r.headers["Content-Length"] == str(len(audio)) == str(3 * 4800)
    assert r.headers["x-upstream-request-id"] == "req_fake"
    assert "Transfer-Encoding" not in r.headers
    assert r.headers["Server"] == "aisix"  # no version of Python or aiohttp given away


async def test_first_byte_arrives_before_the_upstream_sends_its_last_chunk(gateway: Gateway, fake: FakeUpstream) -> None:
    fake.behaviour = Behaviour(speech_chunks=5, chunk_delay=0.3)
    arrivals = []
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/audio/speech", json=BODY, headers=AUTH) as r:
            async for chunk in r.content.iter_any():
                arrivals.append((time.monotonic(), len(chunk)))
    assert sum(n for _, n in arrivals) == 5 * 4800
    assert len(fake.sent_at) == 5
    assert arrivals[0][0] < fake.sent_at[-1]
    assert len(arrivals) >= 3, "the answer was delivered in one piece, not as it streamed"


@pytest.mark.parametrize("rid, kept", [("abc-123", True), ("x" * 128, True), ("x" * 129, False),
                                       ("has space", False), ("caf\u00e9", False)])
async def test_request_id_kept_only_when_valid(gateway: Gateway, fake: FakeUpstream, rid: str, kept: bool) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/audio/speech", json=BODY,
                          headers={**AUTH, "x-aisix-request-id": rid.encode().decode("latin-1")}) as r:
            await r.read()
    sent = fake.wait_received()[0].headers["x-aisix-request-id"]
    assert sent == r.headers["x-aisix-request-id"]
    assert (sent == rid) is kept
    assert 1 <= len(sent) <= 128


# A provider's 401 is the gateway's own fault (its provider key), not the caller's: it becomes
# 502 upstream_auth_failed, tested in test_routing.py.
@pytest.mark.parametrize("status", [400, 429, 500, 503])
async def test_upstream_errors_are_relayed_as_they_came(gateway: Gateway, fake: FakeUpstream, status: int) -> None:
    fake.behaviour = Behaviour(status=status)
    r, body = await post_speech(gateway)
    assert r.status == status
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.headers["x-upstream-request-id"] == "req_fake"
    assert json.loads(body)["error"]["message"]  # the provider's own envelope


@pytest.mark.parametrize("content_length", [False, True], ids=["chunked", "content-length"])
async def test_upstream_reset_mid_answer_never_looks_complete(gateway: Gateway, fake: FakeUpstream,
                                                              content_length: bool) -> None:
    fake.behaviour = Behaviour(fail="reset_mid", content_length=content_length, speech_chunks=4)
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/audio/speech", json=BODY, headers=AUTH) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    # The gateway is still serving.
    fake.reset()
    r, audio = await post_speech(gateway)
    assert r.status == 200 and len(audio) == 3 * 4800


async def test_big_integers_keep_their_value_and_order(gateway: Gateway, fake: FakeUpstream) -> None:
    body = {"seed": 2**70 + 1, "model": "tts-prod", "input": "h\u00e9llo 12345678901234567890", "voice": "alloy",
            "speed": 1.5}
    r, _ = await post_speech(gateway, body)
    assert r.status == 200
    sent = json.loads(fake.wait_received()[0].body)
    assert list(sent.items()) == list({**body, "model": "gpt-4o-mini-tts"}.items())


async def test_a_utf8_bom_is_accepted_and_not_sent_on(gateway: Gateway, fake: FakeUpstream) -> None:
    """RFC 8259 lets a parser ignore a leading BOM, and some Windows tools write one."""
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/audio/speech", data=b"\xef\xbb\xbf" + json.dumps(BODY).encode(),
                          headers={**AUTH, "Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
    sent = fake.wait_received()[0].body
    assert sent.startswith(b"{") and json.loads(sent) == {**BODY, "model": "gpt-4o-mini-tts"}


async def test_a_body_buffered_in_pieces_before_the_first_read_is_read_whole() -> None:
    # Under load the handler can first read a body that has already arrived whole, in more than
    # one piece (a client that writes its head and its body apart). read_all took "the end has
    # arrived" for "this first piece is all of it" and cut the JSON short: a 400 invalid_json that
    # came and went with the machine's load. A real StreamReader, fed as aiohttp's parser feeds it.
    from aiohttp.base_protocol import BaseProtocol
    from aiohttp.test_utils import make_mocked_request

    from aisix.deadline import Deadline
    from aisix.exchange import Exchange
    from aisix.inbound import Inbound

    loop = asyncio.get_running_loop()
    body = orjson.dumps({"model": "tts-prod", "input": "x" * 70_000, "voice": "alloy"})
    content = aiohttp.StreamReader(BaseProtocol(loop), 2**16, loop=loop)
    for start in range(0, len(body), 30_000):
        content.feed_data(body[start:start + 30_000])
    content.feed_eof()
    request = make_mocked_request("POST", "/v1/audio/speech", headers={"Content-Type": "application/json"},
                                  payload=content)
    task = asyncio.current_task()
    assert task is not None
    inbound = Inbound(request, 0, Deadline(loop, task), 10.0, Exchange("speech", "rid", 0.0, 0.0))
    assert await inbound.read_all(1 << 20) == body


@pytest.mark.parametrize("depth, big, status", [(253, False, 200), (254, False, 400), (1000, False, 400),
                                                (254, True, 400)],
                         ids=["254-levels", "255-levels", "orjson-reads-it", "exact-integers-same-limit"])
async def test_a_body_nested_too_deep_to_send_on_is_invalid_json_not_a_500(
        gateway: Gateway, fake: FakeUpstream, depth: int, big: bool, status: int) -> None:
    """orjson reads up to 1023 levels but writes only 254: a body nested 255 to 1023 deep was
    admitted (and counted against the key's limits), then failed as the gateway re-serialised it:
    500 internal_error with a traceback at ERROR, for a body docs/api.md says is 400 invalid_json
    ("nested too deep"). A document nested past what can be written is refused when it is read
    (the object and 253 arrays in it: 254 levels, the most orjson writes)."""
    seed = b',"seed":123456789012345678901' if big else b""
    data = b'{"model":"tts-prod","input":"hi","voice":"alloy"%s,"x":%s%s}' % (seed, b"[" * depth, b"]" * depth)
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/audio/speech", data=data,
                          headers={**AUTH, "Content-Type": "application/json"}) as r:
            body = await r.read()
    assert r.status == status, body
    if status == 400:
        assert json.loads(body)["error"]["code"] == "invalid_json"
        assert fake.received == []
