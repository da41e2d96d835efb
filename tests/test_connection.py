"""One connection's edges, on raw sockets and with curl: an HTTP/1.0 caller's unframed answer,
``Expect: 100-continue`` before a refusal, and the requests aiohttp's HTTP parser refuses."""

from __future__ import annotations

import asyncio
import inspect
import json
import subprocess
from pathlib import Path

import pytest
from aiohttp import web

from aisix import connection
from tests.fakes import Behaviour, FakeUpstream
from tests.gateway import TEAM_A, Gateway
from tests.test_hostile import host_port, raw

SPEECH_BODY = b'{"model":"tts-prod","input":"hi","voice":"alloy"}'


def split(answer: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


def envelope_of(answer: bytes, status: bytes, code: str) -> dict[str, bytes]:
    """The answer is one envelope with this status line and code; its headers, names lowered."""
    lines, body = split(answer)
    assert lines[0] == status, answer[:300]
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    headers = {name.lower(): value for name, value in headers.items()}
    assert headers[b"content-type"].startswith(b"application/json")
    doc = json.loads(body)
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    kind = "authentication_error" if code == "invalid_api_key" else "invalid_request_error"
    assert (doc["error"]["type"], doc["error"]["code"], doc["error"]["param"]) == (kind, code, None)
    return headers


# -- HTTP/1.0 callers ------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [False, True], ids=["chunked-upstream", "length-upstream"])
async def test_an_http10_keep_alive_caller_gets_its_speech_to_the_end(gateway: Gateway, fake: FakeUpstream,
                                                                     length: bool) -> None:
    """Speech the upstream sends chunked has no length an HTTP/1.0 caller can read: the
    connection's end frames it, so the connection ends with the audio (not 30 s later, at the
    keep-alive timeout). With a length, the connection is kept as the caller asked."""
    fake.behaviour = Behaviour(content_length=length)
    reader, writer = await asyncio.open_connection(*host_port(gateway))
    writer.write(b"POST /v1/audio/speech HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
                 b"Authorization: Bearer " + TEAM_A.encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(SPEECH_BODY) + SPEECH_BODY)
    try:
        if length:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            answer = head + await asyncio.wait_for(reader.readexactly(3 * 4800), 5)
        else:
            answer = await asyncio.wait_for(reader.read(), 5)  # to EOF: the only end it has
    finally:
        writer.close()
    lines, body = split(answer)
    assert lines[0] == b"HTTP/1.0 200 OK" and len(body) == 3 * 4800
    assert b"Transfer-Encoding: chunked" not in lines
    if length:
        assert b"Content-Length: 14400" in lines and b"Connection: keep-alive" in lines
    else:
        assert not any(line.lower().startswith(b"content-length") for line in lines)
        assert b"Connection: keep-alive" not in lines


async def test_an_http10_request_with_a_transfer_encoding_ends_its_connection(gateway: Gateway,
                                                                              fake: FakeUpstream) -> None:
    """HTTP/1.0 has no transfer codings: a peer in front may have framed this body otherwise, so
    where the next request starts is unknown. RFC 9112, 6.1: processed, then the connection is
    closed; the request pipelined behind it, keep-alive or not, is never read nor forwarded."""
    fake.behaviour = Behaviour(content_length=True)  # an answer with a length: it would keep the connection
    first = (b"POST /v1/audio/speech HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
             b"Authorization: Bearer " + TEAM_A.encode() + b"\r\nContent-Type: application/json\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(SPEECH_BODY) + SPEECH_BODY + b"\r\n0\r\n\r\n")
    second = (b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nConnection: close\r\nx-aisix-request-id: behind-it\r\n"
              b"Authorization: Bearer " + TEAM_A.encode() + b"\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(SPEECH_BODY) + SPEECH_BODY)
    answer = await raw(gateway, first + second)  # to the end of the connection
    lines, _ = split(answer)
    assert answer.count(b"HTTP/1.") == 1
    assert lines[0] == b"HTTP/1.0 200 OK" and b"Connection: close" in lines
    received = fake.wait_received(1)
    assert len(received) == 1 and received[0].headers["x-aisix-request-id"] != "behind-it"


@pytest.mark.parametrize("coding", [b"", b" , "])
async def test_a_transfer_encoding_naming_no_coding_is_400_and_ends_its_connection(
        gateway: Gateway, fake: FakeUpstream, coding: bytes) -> None:
    """aiohttp frames such a body by its Content-Length; a peer in front that takes any
    Transfer-Encoding for chunked frames it otherwise. RFC 9112, 6.3: 400, and the connection
    closed; the request pipelined behind it is never read nor forwarded."""
    first = (b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TEAM_A.encode()
             + b"\r\nContent-Type: application/json\r\nTransfer-Encoding:" + coding
             + b"\r\nContent-Length: %d\r\n\r\n" % len(SPEECH_BODY) + SPEECH_BODY)
    second = (b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
              b"Authorization: Bearer " + TEAM_A.encode() + b"\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(SPEECH_BODY) + SPEECH_BODY)
    answer = await raw(gateway, first + second)  # to the end of the connection
    lines, body = split(answer)
    assert answer.count(b"HTTP/1.") == 1
    assert lines[0] == b"HTTP/1.1 400 Bad Request" and b"Connection: close" in lines \
        or lines[0] == b"HTTP/1.0 400 Bad Request"  # (aiohttp's own parser refuses " , ", and closes)
    assert b"invalid_http_request" in body
    assert fake.received == []

# -- Expect: 100-continue ------------------------------------------------------------------------


async def expecting(gw: Gateway, key: str, length: int, path: str = "/v1/audio/speech",
                    ctype: str = "application/json") -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a head with Expect: 100-continue and no body; the first thing the gateway answers."""
    reader, writer = await asyncio.open_connection(*host_port(gw))
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: {ctype}\r\n"
                 f"Expect: 100-continue\r\nContent-Length: {length}\r\n\r\n".encode())
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5), reader, writer


@pytest.mark.parametrize("key, length, ctype, status, code", [
    ("sk-wrong", 1000, "application/json", b"HTTP/1.1 401 Unauthorized", "invalid_api_key"),
    (TEAM_A, 2 * 1024 * 1024, "application/json", b"HTTP/1.1 413 Request Entity Too Large", "request_too_large"),
    (TEAM_A, 1000, "text/plain", b"HTTP/1.1 400 Bad Request", "unsupported_content_type"),
], ids=["wrong-key", "declared-over-the-cap", "content-type"])
async def test_a_decided_refusal_comes_without_100_continue(make_gateway, fake: FakeUpstream, key: str,
                                                           length: int, ctype: str, status: bytes, code: str) -> None:
    gw = make_gateway({"proxy": {"request_body_limit_bytes": 1024 * 1024}})
    head, reader, writer = await expecting(gw, key, length, ctype=ctype)
    try:
        assert head.startswith(status), head  # the final answer first: no 100 before it
        length_line = next(line for line in head.split(b"\r\n") if line.startswith(b"Content-Length: "))
        body = await asyncio.wait_for(reader.readexactly(int(length_line.split(b": ")[1])), 5)
    finally:
        writer.close()
    headers = envelope_of(head + body, status, code)
    assert headers[b"connection"] == b"close"  # the body it holds back is not awaited on this connection
    rid = headers[b"x-aisix-request-id"].decode()
    event = gw.event(rid)
    assert (event["error_code"], event["bytes_in"]) == (code, 0)
    assert fake.received == []


async def test_an_accepted_request_is_invited_then_answered(gateway: Gateway, fake: FakeUpstream) -> None:
    head, reader, writer = await expecting(gateway, TEAM_A, len(SPEECH_BODY))
    try:
        assert head == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(SPEECH_BODY)
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert final.startswith(b"HTTP/1.1 200 OK")
        assert b"Connection: close" not in final  # the body was read: the connection is kept
    finally:
        writer.close()
    assert b'"model":"gpt-4o-mini-tts"' in fake.wait_received()[0].body


async def test_get_routes_never_invite(gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection(*host_port(gateway))
    writer.write(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEAM_A}\r\n"
                 "Expect: 100-continue\r\n\r\n".encode())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize("key, status", [("sk-wrong", 401), (TEAM_A, 413)])
def test_curl_does_not_upload_what_is_refused(make_gateway, tmp_path: Path, key: str, status: int) -> None:
    """curl waits for 100 Continue (up to --expect100-timeout) before a -F upload: refused at
    the head, it sends none of the file. Before, it was invited and sent the whole file."""
    limit = 1024 * 1024
    gw = make_gateway({"proxy": {"request_body_limit_bytes": limit}})
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"RIFF" + bytes(limit - 1000 if status == 401 else 2 * limit))
    run = subprocess.run(
        ["curl", "-sS", "-v", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}", "--expect100-timeout", "30",
         "-H", "Expect: 100-continue", "-H", f"Authorization: Bearer {key}",
         "-F", "model=whisper-prod", "-F", f"file=@{audio}", gw.url + "/v1/audio/transcriptions"],
        capture_output=True, text=True, timeout=30)
    assert run.stdout.split() == [str(status), "0"], run.stderr
    assert "< HTTP/1.1 100 Continue" not in run.stderr
    assert "Expect: 100-continue" in run.stderr  # curl did ask


@pytest.mark.parametrize("path, ctype, first, bad", [
    ("/v1/audio/speech", "application/json", b'{"model":"tts-prod",', b'zz\r\n"input":"x"}\r\n0\r\n\r\n'),
    ("/v1/audio/speech", "application/json", b'{"model":"tts-prod",', b'3\r\nabcdef\r\n0\r\n\r\n'),
    ("/v1/audio/transcriptions", "multipart/form-data; boundary=b",
     b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-prod\r\n', b'-1\r\nx\r\n'),
], ids=["speech-size-not-hex", "speech-chunk-longer-than-said", "form-size-not-hex"])
async def test_broken_chunk_framing_in_a_body_under_way_is_400_at_once(gateway: Gateway, fake: FakeUpstream,
                                                                      path: str, ctype: str, first: bytes,
                                                                      bad: bytes) -> None:
    """aiohttp's C parser forgets a body whose framing breaks without telling its reader, which
    then waited out the 60 s idle timeout (408); the body is now given the parser's error."""
    reader, writer = await asyncio.open_connection(*host_port(gateway))
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEAM_A}\r\nContent-Type: {ctype}\r\n"
                     "Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"%x\r\n" % len(first) + first + b"\r\n")  # the handler is reading the body: then
        writer.write(bad)
        answer = await asyncio.wait_for(reader.read(), 5)  # to the connection's end, well before the idle timeout
    finally:
        writer.close()
    headers = envelope_of(answer, b"HTTP/1.1 400 Bad Request", "invalid_body")  # one answer, then the end
    event = gateway.event(headers[b"x-aisix-request-id"].decode())
    assert (event["status"], event["error_code"]) == (400, "invalid_body")
    assert all(not r.complete for r in fake.received)


# -- what aiohttp's HTTP parser refuses ----------------------------------------------------------


@pytest.mark.parametrize("request_bytes", [
    b"GET /v1/models HTTP/1.1\r\nBad Header\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /v1/" + b"m" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(40) + b"\r\n\r\n",  # TLS to the HTTP port
], ids=["header-without-colon", "long-header-line", "long-request-line", "two-framings", "not-http"])
async def test_parser_refusals_are_envelopes_with_a_request_id(make_gateway, request_bytes: bytes) -> None:
    gw = make_gateway()
    answer = await raw(gw, request_bytes)
    # aiohttp answers what it could not parse as HTTP/1.0, and one answer only: the connection ends.
    headers = envelope_of(answer, b"HTTP/1.0 400 Bad Request", "invalid_http_request")
    rid = headers[b"x-aisix-request-id"]
    assert len(rid) == 32 and headers[b"x-request-id"] == rid and headers[b"server"] == b"aisix"
    assert answer.count(b"HTTP/1.0 400") == 1  # raw() read to the end: the connection closed after it
    gw.wait_log(f"rid={rid.decode()}")  # the access line carries it: the operator finds the request


async def test_the_aiohttp_internals_the_handler_relies_on() -> None:
    """aisix/connection.py subclasses aiohttp's server and connection classes: this fails the day
    an aiohttp release moves what it overrides or calls."""
    assert list(inspect.signature(web.RequestHandler.handle_error).parameters) == \
        ["self", "request", "status", "exc", "message"]
    assert "handle_error" in inspect.getsource(web.RequestHandler._make_error_handler)
    server = web.Server(lambda request: None, keepalive_timeout=3)  # type: ignore[arg-type,return-value]
    assert (server._loop, server._kwargs) == (asyncio.get_running_loop(), {"keepalive_timeout": 3})
    assert isinstance(connection.Server(server.request_handler, loop=server._loop)(), connection.RequestHandler)
