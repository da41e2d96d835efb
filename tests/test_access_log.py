"""The access log of a real gateway: one line per request, 499s included, the key's name, body
bytes on every route, probes only when asked, and nothing a caller can forge."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import aiohttp
import pytest

from aisix.config import hash_key
from tests.fakes import Behaviour, FakeUpstream
from tests.gateway import TEAM_A, Gateway
from tests.test_disconnects import FILE_HEAD, MODEL_PART, close, open_upload
from tests.test_transcriptions import form

SPEECH = json.dumps({"model": "tts-prod", "input": "Hello there", "voice": "alloy"}).encode()
AUTH = {"Authorization": f"Bearer {TEAM_A}"}
SPEECH_HEADERS = {**AUTH, "Content-Type": "application/json"}
OPS_KEY = "sk-ops-team-access"
_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]+)')


def lines(gw: Gateway, rid: str) -> list[str]:
    return [line for line in gw.lines if "aisix.access" in line and f" rid={rid} " in line]


def fields(line: str) -> dict[str, str]:
    """status and the key=value fields after the request line; a quoted value is JSON."""
    status, rest = line.split('" ', 1)[1].split(" ", 1)
    found = {name: json.loads(value) if value.startswith('"') else value for name, value in _PAIR.findall(rest)}
    assert " ".join(f"{n}={v}" for n, v in _PAIR.findall(rest)) == rest.strip(), line  # nothing else
    return {"status": status, **found}


async def call(gw: Gateway, method: str, path: str, rid: str, body: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, int]:
    """The status and the body bytes the caller received."""
    async with aiohttp.ClientSession() as s:
        async with s.request(method, gw.url + path, data=body,
                             headers={"x-aisix-request-id": rid, **(headers or {})}) as r:
            return r.status, len(await r.read())


async def settled(gw: Gateway, rid: str) -> list[str]:
    """The lines of rid, once a later request's line is written: a request logged twice, or
    late, would be by then (each line is written before its connection reads another request)."""
    barrier = uuid.uuid4().hex
    await call(gw, "GET", "/v1/models", barrier, headers=AUTH)
    gw.wait_log(f" rid={barrier} ")
    return lines(gw, rid)


async def test_the_line(gateway: Gateway, fake: FakeUpstream) -> None:
    rid = uuid.uuid4().hex
    assert await call(gateway, "POST", "/v1/audio/speech", rid, SPEECH, SPEECH_HEADERS) == (200, 14400)
    line = gateway.wait_log(f" rid={rid} ")
    assert line.split(" aisix.access: ")[1].startswith('127.0.0.1 "POST /v1/audio/speech" 200 rid=')
    f = fields(line)
    assert (f["key"], f["model"], f["bytes_in"], f["bytes_out"]) == ("team-a", "tts-prod", str(len(SPEECH)), "14400")
    assert int(f["latency_ms"]) >= 0
    assert TEAM_A not in gateway.log()


async def test_access_log_off(make_gateway, fake: FakeUpstream) -> None:
    gw = make_gateway(args=["--access-log", "off"])
    rid, left = uuid.uuid4().hex, uuid.uuid4().hex
    assert (await call(gw, "POST", "/v1/audio/speech", rid, SPEECH, SPEECH_HEADERS))[0] == 200
    gw.event(rid)
    await leave_mid_download(gw, fake, left)  # the 499 path writes its own line: not here either
    assert gw.event(left)["status"] == 499
    assert " rid=" not in gw.log()


async def leave_mid_download(gw: Gateway, fake: FakeUpstream, rid: str) -> None:
    fake.behaviour = Behaviour(speech_chunks=100, chunk_delay=0.1)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/speech", data=SPEECH,
                          headers={**SPEECH_HEADERS, "x-aisix-request-id": rid}) as r:
            await r.content.readany()  # then the session closes the connection


async def leave_mid_upload(gw: Gateway, fake: FakeUpstream, rid: str) -> None:
    reader, writer = await open_upload(gw, rid, 10_000_000)
    writer.write(MODEL_PART + FILE_HEAD + bytes(100_000))
    await writer.drain()
    await close(writer)


async def leave_before_the_answer(gw: Gateway, fake: FakeUpstream, rid: str) -> None:
    """The request is whole and sent on; the caller leaves while the provider has not answered."""
    fake.behaviour = Behaviour(fail="stall_headers")
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEAM_A}\r\n"
                 f"x-aisix-request-id: {rid}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(SPEECH)}\r\n\r\n".encode() + SPEECH)
    await writer.drain()
    await asyncio.to_thread(fake.wait_received)
    await close(writer)


@pytest.mark.parametrize("leave", [leave_mid_upload, leave_before_the_answer, leave_mid_download])
async def test_a_caller_that_left_has_exactly_one_line(make_gateway, fake: FakeUpstream, leave) -> None:
    gw = make_gateway()
    rid = uuid.uuid4().hex
    await leave(gw, fake, rid)
    event = gw.event(rid)
    assert event["status"] == 499
    (line,) = await settled(gw, rid)
    f = fields(line)
    assert (f["status"], f["key"]) == ("499", "team-a")
    assert (int(f["bytes_in"]), int(f["bytes_out"])) == (event["bytes_in"], event["bytes_out"])
    assert int(f["latency_ms"]) == event["latency_ms"]


async def test_bytes_out_is_the_body_on_every_route(make_gateway, fake: FakeUpstream) -> None:
    gw = make_gateway({"access_log": {"probes": True}},
                      api_keys=[{"display_name": "ops team", "key_hash": hash_key(OPS_KEY), "allowed_models": ["*"]}])
    json_ct = {"Content-Type": "application/json"}
    upload, form_ct = form("model", "file")
    cases = [
        ("speech, chunked", "POST", "/v1/audio/speech", SPEECH, {**AUTH, **json_ct}, Behaviour()),
        ("speech, with a length", "POST", "/v1/audio/speech", SPEECH, {**AUTH, **json_ct},
         Behaviour(content_length=True)),
        ("transcription", "POST", "/v1/audio/transcriptions", upload, {**AUTH, "Content-Type": form_ct}, None),
        ("provider's error", "POST", "/v1/audio/speech", SPEECH, {**AUTH, **json_ct}, Behaviour(status=500)),
        ("gateway's 401", "POST", "/v1/audio/speech", SPEECH, json_ct, None),
        ("gateway's 404 model", "POST", "/v1/audio/speech", SPEECH.replace(b"tts-prod", b"nope"),
         {**AUTH, **json_ct}, None),
        ("models", "GET", "/v1/models", None, {"Authorization": f"Bearer {OPS_KEY}"}, None),
        ("models 401", "GET", "/v1/models", None, {}, None),
        ("no route", "GET", "/v2/nothing", None, {}, None),
        ("wrong method", "DELETE", "/livez", None, {}, None),
        ("livez", "GET", "/livez", None, {}, None),
        ("readyz", "GET", "/readyz", None, {}, None),
        ("HEAD livez", "HEAD", "/livez", None, {}, None),
    ]
    for what, method, path, body, headers, behaviour in cases:
        fake.behaviour = behaviour or Behaviour()
        rid = uuid.uuid4().hex
        status, received = await call(gw, method, path, rid, body, headers)
        f = fields(gw.wait_log(f" rid={rid} "))
        assert (f["status"], f["bytes_out"]) == (str(status), str(received)), what
        if path.startswith("/v1/audio/"):
            assert f["bytes_out"] == str(gw.event(rid)["bytes_out"]), what
    assert received == 0  # HEAD: no body, whatever its Content-Length says
    models = [line for line in gw.lines if '"GET /v1/models" 200' in line]
    assert fields(models[0])["key"] == "ops team"  # a name with a space is quoted


async def test_probes_are_left_out_unless_asked(gateway: Gateway) -> None:
    rids = [uuid.uuid4().hex for _ in range(3)]
    for rid, (method, path) in zip(rids, [("GET", "/livez"), ("GET", "/readyz"), ("HEAD", "/livez")]):
        assert (await call(gateway, method, path, rid))[0] == 200
    for rid in rids:
        assert await settled(gateway, rid) == []


async def test_a_caller_cannot_forge_a_line(gateway: Gateway) -> None:
    rid = uuid.uuid4().hex
    model = 'nope\nFORGED 127.0.0.1 "GET /" 200'
    body = json.dumps({"model": model, "input": "x", "voice": "alloy"}).encode()
    assert (await call(gateway, "POST", "/v1/audio/speech", rid, body, SPEECH_HEADERS))[0] == 404
    assert (await call(gateway, "GET", "/v1/x%0AFORGED%20y", rid))[0] == 404
    assert fields(gateway.wait_log(f" rid={rid} "))["model"] == model
    assert " 404 " in gateway.wait_log('"GET /v1/x%0AFORGED%20y"')  # the path as sent
    assert not any(line.startswith("FORGED") for line in gateway.lines)


async def test_a_quote_in_the_path_cannot_end_the_request_field(gateway: Gateway) -> None:
    # A path may hold a '"' (aiohttp takes it as sent): the request field ended there, and a
    # parser of the line read the rest as other fields.
    host, port = gateway.url.removeprefix("http://").split(":")
    rid = uuid.uuid4().hex
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b'GET /v1/x"%20200%20rid=forged\\ HTTP/1.1\r\nHost: x\r\nx-aisix-request-id: '
                     + rid.encode() + b"\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 404")
    finally:
        writer.close()
    line = gateway.wait_log(f" rid={rid} ")
    assert '"GET /v1/x%22%20200%20rid=forged%5C" 404 ' in line
    assert fields(line)["rid"] == rid


async def test_a_stop_writes_the_lines_still_buffered(make_gateway, fake: FakeUpstream) -> None:
    """Lines wait up to a second in the writer's buffer; SIGTERM writes them before the process
    says it stopped, not never."""
    gw = make_gateway()
    rids = [uuid.uuid4().hex for _ in range(3)]
    for rid in rids:
        assert (await call(gw, "POST", "/v1/audio/speech", rid, SPEECH, SPEECH_HEADERS))[0] == 200
    gw.stop()  # at once: well within the second a line may wait
    log = gw.log()
    for rid in rids:
        assert len(lines(gw, rid)) == 1, log
    assert log.index(f" rid={rids[-1]} ") < log.index("aisix stopped")
