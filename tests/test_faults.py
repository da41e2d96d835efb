"""Upstream faults, table-driven over the answer kinds: what the caller gets, and its one usage event.

Before the answer starts, the caller gets an envelope: 502 ``upstream_unavailable`` (refused,
reset, garbage, a cut header block) or 504 ``upstream_timeout`` (no headers in time). After the
caller has the status line, any failure aborts its connection (a chunked answer is never
terminated, a Content-Length answer never completed: aiohttp's client raises ClientPayloadError)
and the event keeps the status the caller got, with ``upstream_aborted``. Every request has exactly
one usage event.

Two upstreams: the recording fake (its fail modes) and, for the faults it cannot make, a raw
socket upstream here (RST instead of FIN, a chunked body cut at a chunk boundary or with a broken
chunk-size line, headers then silence, an upstream that resets or stops reading mid-upload).

Already covered elsewhere, so left out of the matrix: a speech chunked answer reset mid-way
(test_usage_events::test_upstream_abort_mid_answer) and stalling mid-way
(test_disconnects::test_upstream_stalling_mid_answer_aborts_the_caller).
"""

from __future__ import annotations

import asyncio
import io
import select
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from aisix.devupstream import MP3_FRAME
from tests.fakes import Behaviour, FakeUpstream, SocketUpstream
from tests.gateway import TEAM_A, Gateway
from tests.test_disconnects import established_to
from tests.test_transcriptions import form

TIMEOUT_MS = 400  # to the answer's headers
IDLE_MS = 300  # between chunks, either way
MIB = 1024 * 1024


# -- a raw upstream ------------------------------------------------------------------------------


@dataclass
class Answer:
    content_type: str
    chunks: list[bytes]


SSE_FRAMES = [b'data: {"type": "transcript.text.delta", "delta": "hello "}\n\n',
              b'data: {"type": "transcript.text.delta", "delta": "world"}\n\n',
              b'data: {"type": "transcript.text.done", "text": "hello world"}\n\n']
ANSWERS = {
    "speech": Answer("audio/mpeg", [(MP3_FRAME * 20)[:4800]] * 4),
    "json": Answer("application/json", [b'{"text": "hello world", ', b'"usage": {"type": "tokens", ',
                                        b'"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}}']),
    "sse": Answer("text/event-stream", SSE_FRAMES),
}


class RawUpstream(SocketUpstream):
    """One thread per connection; `fault` says what it does with the next requests."""

    def __init__(self) -> None:
        # A small receive buffer (no autotuning): an upstream that stops reading stops the upload.
        super().__init__(rcvbuf=64 * 1024)
        self.fault = ""
        self.answer = ANSWERS["speech"]
        self.requests: list[tuple[str, bool]] = []  # (path, whole body read)
        # Set by the test once the caller has the answer's first bytes: a fault mid-answer then
        # happens after the gateway has started answering, never in the same read as the headers.
        self.release = threading.Event()

    def _serve(self, conn: socket.socket, number: int) -> None:
        fault, answer = self.fault, self.answer
        try:
            conn.settimeout(30)
            f = conn.makefile("rb")
            path = f.readline().split()[1].decode()
            headers = {}
            while (line := f.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if fault == "rst_during_upload":
                f.read(256 * 1024)
                self.requests.append((path, False))
                return _rst(conn)
            if fault == "no_read_during_upload":
                self.requests.append((path, False))
                return _until_peer_closes(conn)
            complete = _read_body(f, headers)
            self.requests.append((path, complete))
            if fault == "rst_before":
                return _rst(conn)
            chunked = fault.endswith("chunked") or fault in ("bad_chunk_size", "stall_after_headers")
            head = f"HTTP/1.1 200 OK\r\nContent-Type: {answer.content_type}\r\nx-request-id: req_raw\r\n"
            body = b"".join(answer.chunks)
            if fault == "partial_headers":
                conn.sendall(head.encode())  # no blank line: the header block never ends
                return _fin(conn)
            if chunked:
                conn.sendall(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n")
            else:
                conn.sendall(head.encode() + b"Content-Length: %d\r\n\r\n" % len(body))
            first, second = answer.chunks[0], answer.chunks[1]
            if fault == "stall_after_headers":
                return _until_peer_closes(conn)
            if chunked:
                conn.sendall(_chunk(first))
            else:
                conn.sendall(first)
            self.release.wait(10)
            if fault == "fin_mid_length":
                conn.sendall(body[len(first): len(body) // 2 + len(first)])
                return _fin(conn)
            if fault == "rst_mid_length":
                conn.sendall(body[len(first): len(body) // 2 + len(first)])
                return _rst(conn)
            if fault == "fin_mid_chunked":  # a chunk's size line promises more than comes
                conn.sendall(b"%x\r\n" % len(second) + second[: len(second) // 2])
                return _fin(conn)
            if fault == "rst_mid_chunked":
                return _rst(conn)
            if fault == "fin_at_chunk_boundary_chunked":  # every chunk whole, the last-chunk never sent
                conn.sendall(b"".join(_chunk(c) for c in answer.chunks[1:]))
                return _fin(conn)
            if fault == "bad_chunk_size":
                conn.sendall(b"zz\r\n" + second + b"\r\n0\r\n\r\n")
                return _until_peer_closes(conn)
            raise AssertionError(f"unknown fault {fault!r}")
        except OSError:
            conn.close()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def _read_body(f: Any, headers: dict[str, str]) -> bool:
    if "content-length" in headers:
        want = int(headers["content-length"])
        return len(f.read(want)) == want
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                f.readline()
                return True
            f.read(size + 2)
    return True


def _fin(conn: socket.socket) -> None:
    conn.shutdown(socket.SHUT_WR)
    conn.close()


def _rst(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _until_peer_closes(conn: socket.socket, timeout_s: float = 30) -> None:
    """Wait, reading nothing, until the gateway closes its end (bounded)."""
    poller = select.poll()
    poller.register(conn, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    poller.poll(timeout_s * 1000)
    conn.close()


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def faults_gw(fake: FakeUpstream, raw_upstream: RawUpstream,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway with short timeouts; aliases *-fake, *-raw and *-dead (a closed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    providers = [{"display_name": "raw", "provider": "openai", "api_base": f"http://127.0.0.1:{raw_upstream.port}/v1",
                  "api_key": "sk-provider-raw"},
                 {"display_name": "dead", "provider": "openai", "api_base": f"http://127.0.0.1:{dead}/v1",
                  "api_key": "sk-provider-dead"}]
    models = [{"display_name": f"{kind}-{up}", "provider_key": up, "model_name": f"{kind}-upstream"}
              for kind in ("tts", "whisper") for up in ("raw", "dead")]
    gw = Gateway(tmp_path_factory.mktemp("faults"), fake.base_url,
                 {"upstream": {"timeout_ms": TIMEOUT_MS, "stream_idle_timeout_ms": IDLE_MS}},
                 provider_keys=providers, models=models).start()
    yield gw
    gw.stop()


@pytest.fixture(autouse=True)
def _fresh_raw(request: pytest.FixtureRequest) -> None:
    if "raw_upstream" in request.fixturenames:
        raw = request.getfixturevalue("raw_upstream")
        raw.fault, raw.answer, raw.requests = "", ANSWERS["speech"], []
        raw.release.clear()


# -- requests ------------------------------------------------------------------------------------

# kind -> (route, is the answer streamed (the usage event's `stream`), does the fake answer with Content-Length)
KINDS = {
    "speech-chunked": ("speech", True, False),
    "speech-length": ("speech", True, True),
    "transcription-json": ("transcriptions", False, True),
    "transcription-sse": ("transcriptions", True, False),
}


def request_kw(kind: str, upstream: str, rid: str) -> dict[str, Any]:
    route = KINDS[kind][0]
    headers = {"Authorization": f"Bearer {TEAM_A}", "x-aisix-request-id": rid}
    suffix = "prod" if upstream == "fake" else upstream
    if route == "speech":
        return {"url": "/v1/audio/speech", "headers": headers,
                "json": {"model": f"tts-{suffix}", "input": "hi", "voice": "alloy"}}
    fields = [("stream", b"true")] if kind.endswith("sse") else []
    body, ctype = form("model", "file", model=f"whisper-{suffix}".encode(), fields=fields)
    return {"url": "/v1/audio/transcriptions", "data": body, "headers": {**headers, "Content-Type": ctype}}


async def call(gw: Gateway, kw: dict[str, Any], first_read: threading.Event | None = None
               ) -> tuple[int, dict[str, str], bytes | Exception]:
    """Status, headers, and the body, or the exception reading it raised; `first_read` is set
    once the first bytes of the body are in."""
    kw = dict(kw)
    url = gw.url + kw.pop("url")
    async with aiohttp.ClientSession() as s:
        async with s.post(url, **kw) as r:
            try:
                first = await r.content.readany()
                if first_read is not None:
                    first_read.set()
                body: bytes | Exception = first + await r.read()
            except aiohttp.ClientPayloadError as exc:
                body = exc
            return r.status, dict(r.headers), body


async def one_event(gw: Gateway, fake: FakeUpstream, rid: str) -> dict[str, Any]:
    """The request's usage event, and proof that it is the only one: a later request's event is
    written after it, and still no second event for this id."""
    event = gw.event(rid)
    fake.behaviour = Behaviour()
    sentinel = uuid.uuid4().hex
    status, _, _ = await call(gw, request_kw("speech-chunked", "fake", sentinel))
    assert status == 200
    gw.event(sentinel)
    assert [e["request_id"] for e in gw.events()].count(rid) == 1
    return event


def assert_envelope(status: int, headers: dict[str, str], body: bytes | Exception, want: int, code: str) -> None:
    assert not isinstance(body, Exception), body
    assert (status, headers["Content-Type"].split(";")[0]) == (want, "application/json"), body
    assert body.startswith(b'{"error":') and b'"type":"upstream_error"' in body and f'"code":"{code}"'.encode() in body
    assert b"127.0.0.1" not in body and b"sk-provider" not in body


def assert_cut_short(status: int, headers: dict[str, str], body: bytes | Exception, length: bool) -> None:
    assert status == 200
    assert isinstance(body, aiohttp.ClientPayloadError), f"a cut answer read as complete: {body!r}"
    if length:
        assert "Content-Length" in headers and "Transfer-Encoding" not in headers
    else:
        assert headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in headers


# -- the fake's faults ---------------------------------------------------------------------------

BEFORE = [  # (fault, status, code)
    ("refused", 502, "upstream_unavailable"),
    ("reset_before", 502, "upstream_unavailable"),
    ("garbage", 502, "upstream_unavailable"),
    ("stall_headers", 504, "upstream_timeout"),
]
BEFORE_KINDS = ["speech-chunked", "transcription-json", "transcription-sse"]


@pytest.mark.parametrize("kind", BEFORE_KINDS)
@pytest.mark.parametrize("fault, status, code", BEFORE, ids=[f[0] for f in BEFORE])
async def test_fake_fault_before_the_answer(faults_gw: Gateway, fake: FakeUpstream, kind: str, fault: str,
                                            status: int, code: str) -> None:
    rid = uuid.uuid4().hex
    if fault != "refused":
        fake.behaviour = Behaviour(fail=fault)
    got = await call(faults_gw, request_kw(kind, "dead" if fault == "refused" else "fake", rid))
    assert_envelope(*got, status, code)
    event = await one_event(faults_gw, fake, rid)
    assert (event["status"], event["error_code"], event["stream"]) == (status, code, False)


MID = ["reset_mid", "stall"]
MID_CASES = [(fault, kind) for fault in MID for kind in KINDS if kind != "speech-chunked"]  # see the docstring


@pytest.mark.parametrize("fault, kind", MID_CASES, ids=[f"{f}-{k}" for f, k in MID_CASES])
async def test_fake_fault_mid_answer(faults_gw: Gateway, fake: FakeUpstream, fault: str, kind: str) -> None:
    _, streamed, length = KINDS[kind]
    rid = uuid.uuid4().hex
    fake.behaviour = Behaviour(fail=fault, content_length=length, speech_chunks=4)
    got = await call(faults_gw, request_kw(kind, "fake", rid))
    assert_cut_short(*got, length=length)
    event = await one_event(faults_gw, fake, rid)
    assert (event["status"], event["error_code"], event["stream"]) == (200, "upstream_aborted", streamed)
    assert 0 < event["bytes_out"]


# -- the raw upstream's faults -------------------------------------------------------------------

RAW_BEFORE = ["rst_before", "partial_headers"]
RAW_MID = ["fin_mid_chunked", "rst_mid_chunked", "fin_at_chunk_boundary_chunked", "bad_chunk_size",
           "stall_after_headers", "fin_mid_length", "rst_mid_length"]
RAW_KINDS = {"speech": "speech-chunked", "json": "transcription-json", "sse": "transcription-sse"}


@pytest.mark.parametrize("answer", RAW_KINDS)
@pytest.mark.parametrize("fault", RAW_BEFORE)
async def test_raw_fault_before_the_answer(faults_gw: Gateway, fake: FakeUpstream, raw_upstream: RawUpstream,
                                           fault: str, answer: str) -> None:
    raw_upstream.fault, raw_upstream.answer = fault, ANSWERS[answer]
    rid = uuid.uuid4().hex
    got = await call(faults_gw, request_kw(RAW_KINDS[answer], "raw", rid))
    assert_envelope(*got, 502, "upstream_unavailable")
    event = await one_event(faults_gw, fake, rid)
    assert (event["status"], event["error_code"]) == (502, "upstream_unavailable")
    route = KINDS[RAW_KINDS[answer]][0]
    assert raw_upstream.requests == [(f"/v1/audio/{route}", True)]  # it had the whole request


@pytest.mark.parametrize("answer", RAW_KINDS)
@pytest.mark.parametrize("fault", RAW_MID)
async def test_raw_fault_mid_answer(faults_gw: Gateway, fake: FakeUpstream, raw_upstream: RawUpstream, fault: str,
                                    answer: str) -> None:
    raw_upstream.fault, raw_upstream.answer = fault, ANSWERS[answer]
    rid = uuid.uuid4().hex
    status, headers, body = await call(faults_gw, request_kw(RAW_KINDS[answer], "raw", rid), raw_upstream.release)
    assert_cut_short(status, headers, body, length=fault.endswith("length"))
    assert headers["x-upstream-request-id"] == "req_raw"
    event = await one_event(faults_gw, fake, rid)
    assert (event["status"], event["error_code"]) == (200, "upstream_aborted")
    assert event["stream"] == (answer != "json")


async def big_upload(size: int):
    """A transcription form, model first, with a file of `size` bytes, made as it is sent."""
    body, _ = form("model", "file", model=b"whisper-raw", file=b"<file>")
    before, after = body.split(b"<file>")
    block = bytes(range(256)) * 4096  # 1 MiB
    yield before
    for _ in range(size // MIB):
        yield block
    yield after


@pytest.mark.parametrize("fault, status, code", [("rst_during_upload", 502, "upstream_unavailable"),
                                                 ("no_read_during_upload", 504, "upstream_timeout")])
async def test_raw_fault_during_the_upload(faults_gw: Gateway, fake: FakeUpstream, raw_upstream: RawUpstream,
                                           fault: str, status: int, code: str) -> None:
    """The upstream resets, or stops reading, while a 24 MiB upload streams to it: the caller gets
    the envelope without waiting for its upload to end."""
    raw_upstream.fault = fault
    rid = uuid.uuid4().hex
    _, ctype = form("model", "file")
    kw = {"url": "/v1/audio/transcriptions", "data": big_upload(24 * MIB),
          "headers": {"Authorization": f"Bearer {TEAM_A}", "x-aisix-request-id": rid,
                      "Content-Type": ctype}}
    got = await call(faults_gw, kw)
    assert_envelope(*got, status, code)
    event = await one_event(faults_gw, fake, rid)
    assert (event["status"], event["error_code"]) == (status, code)
    assert 0 < event["bytes_in"] < 24 * MIB
    assert raw_upstream.requests == [("/v1/audio/transcriptions", False)]



async def test_an_upload_to_an_upstream_that_stopped_reading_lets_go_of_it(
        faults_gw: Gateway, fake: FakeUpstream, raw_upstream: RawUpstream) -> None:
    raw_upstream.fault = "no_read_during_upload"
    held_before = established_to(faults_gw.pid, raw_upstream.port)  # what an earlier case left
    rid = uuid.uuid4().hex
    _, ctype = form("model", "file")
    headers = {"Authorization": f"Bearer {TEAM_A}", "x-aisix-request-id": rid, "Content-Type": ctype}
    status, _, _ = await call(faults_gw, {"url": "/v1/audio/transcriptions", "data": big_upload(24 * MIB),
                                          "headers": headers})
    assert status == 504
    event = await one_event(faults_gw, fake, rid)
    assert (event["status"], event["error_code"]) == (504, "upstream_timeout")
    deadline = time.monotonic() + 10 * IDLE_MS / 1000
    while established_to(faults_gw.pid, raw_upstream.port) > held_before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # polling an observable (the socket table), bounded by the deadline
    assert established_to(faults_gw.pid, raw_upstream.port) == held_before


class PacedUpstream(SocketUpstream):
    """Reads a request's first `slow_bytes` of body at a steady pace (64 KiB every 10 ms, never
    silent for long), the rest at once, then answers 200: an upstream slower to read an upload
    than the answer timeout, but never idle."""

    def __init__(self, slow_bytes: int) -> None:
        super().__init__(rcvbuf=64 * 1024)
        self.slow_bytes = slow_bytes
        self.requests: list[tuple[int, bool]] = []  # (body bytes read, whole)

    def _serve(self, conn: socket.socket, number: int) -> None:
        try:
            conn.settimeout(30)
            f = conn.makefile("rb")
            f.readline()
            headers = {}
            while (line := f.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            want, got = int(headers["content-length"]), 0
            while got < want:
                data = f.read(min(64 * 1024, want - got) if got < self.slow_bytes else want - got)
                if not data:
                    break
                got += len(data)
                if got < self.slow_bytes:
                    time.sleep(0.01)  # the upstream's pace, not a synchronisation
            self.requests.append((got, got == want))
            body = b'{"text": "read slowly"}'
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            _until_peer_closes(conn)
        except OSError:
            conn.close()


@pytest.mark.parametrize("case", ["file-first", "replayed"])
async def test_an_upload_the_upstream_reads_steadily_is_not_cut_by_the_answer_timeout(
        fake: FakeUpstream, make_gateway: Any, case: str) -> None:
    """Bytes the gateway had stored (what came before the model, a replay's copy) are written at the
    pace the upstream reads, as the caller's own are: the upstream not reading for
    stream_idle_timeout_ms is a timeout, a steady upload longer than the answer's timeout is not."""
    paced = PacedUpstream(slow_bytes=8 * MIB)
    try:
        providers = [{"display_name": "paced", "provider": "openai", "api_base": paced.base_url,
                      "api_key": "sk-provider-paced"}]
        targets = [{"provider_key": "fake", "model_name": "whisper-a"},
                   {"provider_key": "paced", "model_name": "whisper-b", "priority": 1}]
        models = [{"display_name": "whisper-paced", "provider_key": "paced", "model_name": "whisper-b"},
                  {"display_name": "whisper-replayed", "targets": targets}]
        gw = make_gateway({"upstream": {"timeout_ms": 500, "connect_timeout_ms": 200,
                                        "stream_idle_timeout_ms": 5000}},
                          provider_keys=providers, models=models)
        audio = b"RIFF" + bytes(16 * MIB)
        if case == "file-first":  # held whole before the model value, then written from there
            data, ctype = form("file", "model", model=b"whisper-paced", file=audio)
        else:  # the first target reads it all and answers 503: the second gets it from the copy
            data, ctype = form("model", "file", model=b"whisper-replayed", file=audio)
            fake.behaviour = Behaviour(status=503, keep_body=False)
        rid = uuid.uuid4().hex
        status, _, body = await call(gw, {"url": "/v1/audio/transcriptions", "data": io.BytesIO(data), "headers": {
            "Authorization": f"Bearer {TEAM_A}", "x-aisix-request-id": rid, "Content-Type": ctype}})
        assert status == 200, body
        assert body == b'{"text": "read slowly"}'
        assert [complete for _, complete in paced.requests] == [True]
        event = gw.event(rid)
        assert [a["status"] for a in event["attempts"]] == ([200] if case == "file-first" else [503, 200])
    finally:
        paced.stop()
