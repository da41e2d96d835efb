"""Every length the gateway declares upstream is one it can prove: coded bodies are refused, the
upstream writer counts what it writes against the Content-Length it sent, and a form the gateway
refuses never reaches the upstream whole, whatever its framing.

The attack this guards against: a gzip upload was decoded by the server while the upstream was
told the caller's compressed Content-Length, so the bytes past it were read by the provider as
the start of the next request on that keep-alive connection (another caller's, provider key and
all).
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import json
import socket
import threading
import traceback
import weakref
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from aisix import errors
from aisix.config import UpstreamSettings
from aisix.http1 import Answer, Conn
from aisix.upstream import Pool
from tests.fakes import Behaviour, FakeUpstream, SocketUpstream
from tests.gateway import TEAM_A, Gateway
from tests.test_hostile import END, FORM_TYPE, PASSWORD_RULE, TRANSCRIBE, envelope, post, raw
from tests.test_transcriptions import form, no_complete_request_reached

AUTH = {"Authorization": f"Bearer {TEAM_A}"}


class Recorder(SocketUpstream):
    """Reads requests off each connection as an HTTP/1.1 server would (head, then exactly
    Content-Length body bytes) and answers each with a small 200: what it records is how the
    upstream saw the byte stream, request by request."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[int, bytes, bytes | None]] = []  # (connection, request line, body or None if cut)
        self.ended: set[int] = set()  # connections that are over
        self._changed = threading.Condition()

    def _serve(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(30)
        f = conn.makefile("rb")
        try:
            while line := f.readline():
                length = 0
                while (h := f.readline()) not in (b"\r\n", b""):
                    name, _, value = h.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                try:
                    body: bytes | None = f.read(length)
                except OSError:
                    body = None
                if body is None or len(body) < length:
                    self._record(number, line.rstrip(), None)
                    return
                self._record(number, line.rstrip(), body)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        except OSError:
            pass
        finally:
            conn.close()
            with self._changed:
                self.ended.add(number)
                self._changed.notify_all()

    def _record(self, number: int, line: bytes, body: bytes | None) -> None:
        with self._changed:
            self.requests.append((number, line, body))
            self._changed.notify_all()

    def wait_ended(self, number: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: number in self.ended, timeout=10)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.stop()


async def writes(*sizes: int) -> AsyncIterator[list[bytes | bytearray | memoryview]]:
    for size in sizes:
        yield [b"a" * size]


@pytest.mark.parametrize("sizes", [(5, 5), (3,), (5, 0, 1)], ids=["past-it", "short-of-it", "one-byte-past"])
async def test_the_writer_aborts_an_upload_that_differs_from_its_content_length(
        recorder: Recorder, sizes: tuple[int, ...]) -> None:
    """Whatever the cause, a body that does not match the declared length is never left for the
    upstream to read as the start of the next request: the connection is aborted, and the next
    request goes on a new one."""
    pool = Pool(UpstreamSettings())
    url = recorder.base_url + "/audio/transcriptions"
    try:
        with pytest.raises(errors.GatewayError) as caught:
            async with asyncio.timeout(10):  # without the count, a short body waits for ever
                await pool.send(url, "Bearer k", "rid-1", "application/octet-stream", None, writes(*sizes), 5)
        assert (caught.value.status, caught.value.code) == (500, "internal_error")
        answer = await pool.send(url, "Bearer k", "rid-2", "application/json", None, b"{}", None)
        assert (answer.status, await answer.read()) == (200, b"{}")
        answer.release()
    finally:
        await pool.close()
    recorder.wait_ended(1)
    # The first connection carried one request at most (a reset may beat its bytes to the
    # reader), the declared bytes at most, then nothing: no second request read off it. The
    # next request went on a new connection.
    *first, last = sorted(recorder.requests, key=lambda r: r[0])  # threads record in any order
    assert last == (2, b"POST /v1/audio/transcriptions HTTP/1.1", b"{}")
    assert first in ([], [(1, b"POST /v1/audio/transcriptions HTTP/1.1", None)],
                     [(1, b"POST /v1/audio/transcriptions HTTP/1.1", b"aaaaa")]), first


async def test_an_aborted_upstream_connection_is_freed_without_a_collection(fake: FakeUpstream) -> None:
    """A caller leaving mid-answer aborts its upstream connection. Nothing of it may wait for the
    cyclic collector, which the gateway runs rarely (server._steady_gc): every such connection
    held its buffers until then (RSS +20 MiB over a few wrk rounds)."""
    fake.behaviour = Behaviour(speech_chunks=4, chunk_delay=0.05)
    pool = Pool(UpstreamSettings())
    gc.disable()
    try:
        answer = await pool.send(fake.base_url + "/audio/speech", "Authorization: Bearer k", "rid-1",
                                 "application/json", None, b'{"model":"m","input":"hi"}', None)
        assert answer.status == 200 and await answer.read()
        conn = weakref.ref(answer._conn)
        answer.close()  # the caller left: the connection is aborted, its answer not read to the end
        for _ in range(1000):  # connection_lost comes on a later turn of the loop, and tells the answer
            if answer._error is not None:
                break
            await asyncio.sleep(0)
        assert isinstance(answer._error, ConnectionError)
        del answer
        assert conn() is None  # its parser, transport and answer no longer hold it in a cycle
    finally:
        gc.enable()
        await pool.close()


async def test_an_upload_refused_mid_way_leaves_nothing_for_the_collector(fake: FakeUpstream) -> None:
    """The upload's own side fails (a bad form, a quota, the caller gone) before any answer: the
    error reaches the pipeline with a traceback that says where, and neither it nor the answer's
    lost head holds the answer or its connection in a cycle for the rare full collection."""
    async def body() -> AsyncIterator[list[bytes | bytearray | memoryview]]:
        yield [b"x" * 10]
        raise ConnectionResetError("the caller left")

    pool = Pool(UpstreamSettings())
    gc.collect()
    gc.disable()
    try:
        with pytest.raises(ConnectionResetError) as caught:
            await pool.send(fake.base_url + "/audio/transcriptions", "Authorization: Bearer k", "rid-1",
                            "application/octet-stream", None, body(), 100)
        assert 'raise ConnectionResetError("the caller left")' in "".join(traceback.format_tb(caught.value.__traceback__))
        del caught
        conns = [weakref.ref(o) for o in gc.get_objects() if isinstance(o, Conn)]
        for _ in range(1000):  # the aborted connection's connection_lost comes on a later turn of the loop
            if all(c() is None or c().transport is None for c in conns):  # type: ignore[union-attr]
                break
            await asyncio.sleep(0)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found = [type(o).__name__ for o in gc.garbage if isinstance(o, Answer | Conn)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        await pool.close()
    assert found == []


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd", "GZIP", "identity, gzip"])
async def test_a_coded_upload_is_refused_before_anything_is_sent(make_gateway, recorder: Recorder,
                                                                 coding: str) -> None:
    """The original attack: a compressible body whose decoded bytes hold a whole second request.
    Refused with 415 before the body is read; the upstream gets nothing, and the next caller's
    request on the gateway's upstream connection is read as itself."""
    gw = make_gateway(upstream_base=recorder.base_url)
    hidden = (b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n" + b"A" * 4000)
    body, ctype = form("model", "file", file=hidden)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + TRANSCRIBE, data=gzip.compress(body),
                          headers={**AUTH, "Content-Type": ctype, "Content-Encoding": coding}) as r:
            error = envelope(r.status, await r.read(), dict(r.headers), 415, "unsupported_content_encoding")
            assert r.headers["Accept-Encoding"] == "identity"
            assert error["param"] is None
        async with s.post(gw.url + TRANSCRIBE, data=body, headers={**AUTH, "Content-Type": ctype}) as r:
            assert r.status == 200
    assert [(line, len(b or b"")) for _, line, b in recorder.requests] == [
        (b"POST /v1/audio/transcriptions HTTP/1.1", len(body) - len(b"whisper-prod") + len(b"whisper-1"))]


@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate,chunked", "x-custom, chunked"])
async def test_a_transfer_coding_besides_chunked_is_refused(gateway: Gateway, fake: FakeUpstream,
                                                            coding: str) -> None:
    """aiohttp undoes the final "chunked" only: the rest would reach the upstream as if it were
    the body. 501, as RFC 9112 says for a transfer coding the server does not understand."""
    body = gzip.compress(b'{"model":"tts-prod","input":"hi","voice":"alloy"}')
    answer = await raw(gateway, f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEAM_A}\r\n"
                                f"Content-Type: application/json\r\nTransfer-Encoding: {coding}\r\n"
                                f"Connection: close\r\n\r\n".encode() + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    head, _, doc = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501 Not Implemented"), answer[:200]
    error = json.loads(doc)["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "unsupported_transfer_encoding", None)
    assert fake.received == []


async def test_identity_is_not_a_coding(gateway: Gateway, fake: FakeUpstream) -> None:
    body, ctype = form("model", "file")
    status, _, _ = await post(gateway, TRANSCRIBE, data=body, ctype=ctype, headers={"Content-Encoding": "identity"})
    assert status == 200 and fake.wait_received()[0].complete


def truncated(order: tuple[str, str], cut: str) -> bytes:
    body, _ = form(*order, file=b"RIFF" + b"\x01" * 50_000)
    if cut == "after-last-part":
        return body.removesuffix(END)  # the last part ends with its CRLF: a clean-looking end
    at = body.index(b"\x01" * 1000) + 20_000
    return body[:at]


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 7919):
        yield data[i:i + 7919]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("cut", ["mid-file", "after-last-part"])
@pytest.mark.parametrize("order", [("model", "file"), ("file", "model")], ids=["model-first", "file-first"])
async def test_a_form_cut_short_never_reaches_the_upstream_whole(
        gateway: Gateway, fake: FakeUpstream, order: tuple[str, str], cut: str, framing: str) -> None:
    """The HTTP body is complete but the form is not (no closing delimiter): the gateway holds
    back the end of the body until it has seen that delimiter, so the upstream never receives
    every byte its Content-Length promised."""
    body = truncated(order, cut)
    data = body if framing == "content-length" else _chunks(body)
    status, headers, out = await post(gateway, TRANSCRIBE, data=data, ctype=FORM_TYPE)
    envelope(status, out, headers, 400, "invalid_multipart")
    await no_complete_request_reached(gateway, fake)


@pytest.mark.parametrize("where", ["before-model", "after-file"])
async def test_repeated_prompts_are_relayed_and_every_one_screened(make_gateway, fake: FakeUpstream,
                                                                   where: str) -> None:
    gw = make_gateway(guardrails=PASSWORD_RULE)

    def body(*prompts: bytes) -> bytes:
        fields = [("prompt", p) for p in prompts]
        if where == "before-model":
            return form(*fields, "file", "model")[0]
        return form("model", "file", fields=fields)[0]

    ok = body(b"first hint", b"second hint")
    status, _, out = await post(gw, TRANSCRIBE, data=ok, ctype=FORM_TYPE)
    assert status == 200, out
    got = fake.wait_received()[0]
    assert got.complete and got.body == ok.replace(b"whisper-prod", b"whisper-1")
    fake.reset()
    status, headers, out = await post(gw, TRANSCRIBE, data=body(b"a harmless hint", b"my password is x"),
                                      ctype=FORM_TYPE)
    envelope(status, out, headers, 422, "guardrail_blocked")
    await no_complete_request_reached(gw, fake)
