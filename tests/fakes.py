"""One fake OpenAI audio upstream for the tests: records what it got, streams, fails on request.

It runs in its own thread with its own event loop, so one instance can serve a whole test module
whatever loop each test runs on. It never parses the multipart body it receives (the bytes are
the thing under test); `response_format` and `stream` are found by a regex over the raw bytes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass

import multidict
from aiohttp import web

from aisix.devupstream import MP3_FRAME

FAIL_MODES = (None, "reset_before", "reset_mid", "stall", "stall_headers", "garbage")
_FIELD = r'name="%s"[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n([A-Za-z_]+)'
_RESPONSE_FORMAT = re.compile(_FIELD.encode() % b"response_format")
_STREAM = re.compile(_FIELD.encode() % b"stream")
_SSE_SPEECH = re.compile(rb'"stream_format"\s*:\s*"sse"')
SPEECH_USAGE = {"input_tokens": 7, "output_tokens": 120, "total_tokens": 127}  # a speech.audio.done's
_WINDOW = 64 * 1024
ROUTES = ("speech", "transcriptions", "translations")


def _abort(request: web.Request) -> None:
    """Drop the connection now; the peer sees it end (FIN) with no more bytes."""
    if request.transport is not None:
        request.transport.abort()


def _close(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


@dataclass
class Received:
    method: str
    path: str
    headers: multidict.CIMultiDict[str]
    body: bytes
    complete: bool  # False when the body read failed or was cut, or read_body was False
    chunks_in: int  # how many body chunks arrived
    size: int = 0  # body bytes that arrived, kept or not (see Behaviour.keep_body)
    sha256: str = ""  # of every body byte that arrived, kept or not
    query: str = ""


@dataclass
class Behaviour:
    """What the fake does on the next requests; tests replace `fake.behaviour` whole."""

    status: int = 200  # non-200: an OpenAI error envelope with this status
    speech_chunks: int = 3
    speech_chunk_bytes: int = 4800  # whole MP3 frames, repeated and cut to this size
    chunk_delay: float = 0.0  # seconds between chunks (speech and SSE)
    content_length: bool = False  # speech: Content-Length instead of chunked
    transcript: str = "hello from the fake"
    fail: str | None = None  # one of FAIL_MODES
    read_body: bool = True  # False: answer without reading the request body
    keep_body: bool = True  # False: count the body's bytes (Received.size) but keep none of them
    read_bytes: int | None = None  # read at least this much of the body, then answer (`status`)
    status_only_for: bytes | None = None  # a form's model value: `status` for it, 200 for any other
    error_headers: dict[str, str] | None = None  # sent with the `status` envelope (Retry-After, ...)
    error_message: str | None = None  # the `status` envelope's message (else "fake upstream error <status>")
    answer_fields: dict | None = None  # merged into a JSON transcript's answer (its usage, a duration, ...)

    def __post_init__(self) -> None:
        assert self.fail in FAIL_MODES, f"unknown fail mode {self.fail!r}"


class FakeUpstream:
    """Serves `POST /v1/audio/{speech,transcriptions,translations}` on 127.0.0.1, port 0."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self.ssl_context = ssl_context  # https://host:port/v1 when set (host: a name the cert has)
        self.host = host
        self.behaviour = Behaviour()
        self.received: list[Received] = []
        self.sent_at: list[float] = []
        self.base_url = ""
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None
        # Bumped by reset(): a request still running from an earlier test records nothing after it.
        self._generation = 0

    # -- control, from the test thread --------------------------------------------------------

    def start(self) -> None:
        assert self._thread is None, "already started"
        self._thread = threading.Thread(target=self._run, name="fake-upstream", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError("fake upstream failed to start") from self._error

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise RuntimeError("fake upstream failed") from self._error

    def reset(self) -> None:
        self.behaviour = Behaviour()
        with self._cond:
            self._generation += 1
            self.received.clear()
            self.sent_at.clear()

    def wait_received(self, n: int = 1, timeout: float = 10.0) -> list[Received]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.received) >= n, timeout):
                raise AssertionError(f"fake upstream got {len(self.received)} requests, wanted {n}")
            return list(self.received)

    # -- the server, in its own thread ---------------------------------------------------------

    def _run(self) -> None:
        try:  # asyncio.run cancels and awaits whatever is left, so no task outlives stop()
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by start()/stop(); a thread must not die silently
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/audio/{route}", self._handle)
        # Azure OpenAI's two URL shapes: dated deployments, and v1
        app.router.add_post("/openai/deployments/{deployment}/audio/{route}", self._handle)
        app.router.add_post("/openai/v1/audio/{route}", self._handle)
        # handler_cancellation: a stalled answer ends when its client leaves, not only at stop().
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2.0,
                               access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.ssl_context).start()
            port = runner.addresses[0][1]
            self.base_url = f"{'https' if self.ssl_context else 'http'}://{self.host}:{port}/v1"
            self._ready.set()
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    def _record(self, generation: int, received: Received) -> None:
        with self._cond:
            if generation == self._generation:
                self.received.append(received)
                self._cond.notify_all()

    def _sent(self, generation: int) -> None:
        with self._cond:
            if generation == self._generation:
                self.sent_at.append(time.monotonic())

    async def _read(self, request: web.Request, generation: int, keep: bool,
                    up_to: int | None = None) -> bytes | None:
        """The body, or when not kept its first and last 64 KiB (where the small fields are).

        None when the read failed: the peer went away or sent a broken body.
        """
        body, tail, size, chunks, complete = bytearray(), bytearray(), 0, 0, False
        digest = hashlib.sha256()
        try:
            async for chunk in request.content.iter_any():
                size += len(chunk)
                chunks += 1
                digest.update(chunk)
                if keep or len(body) < _WINDOW:
                    body += chunk
                else:
                    tail += chunk
                    del tail[:-_WINDOW]
                if up_to is not None and size >= up_to:
                    break
            complete = up_to is None
            return bytes(body + tail)
        except Exception:  # what is recorded is the point; the traceback is noise
            return None
        finally:  # recorded even when the read fails or the handler is cancelled
            self._record(generation, Received(
                request.method, request.path, multidict.CIMultiDict(request.headers),
                bytes(body) if keep else b"", complete, chunks, size, digest.hexdigest(), request.query_string))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        behaviour, generation = self.behaviour, self._generation
        route = request.match_info["route"]
        if route not in ROUTES:
            raise web.HTTPNotFound()
        if behaviour.read_bytes is not None:  # part of the upload, then the answer, on a connection to close
            await self._read(request, generation, behaviour.keep_body, behaviour.read_bytes)
            error = {"message": f"fake upstream error {behaviour.status}", "type": "server_error",
                     "param": None, "code": "fake_error"}
            return web.json_response({"error": error}, status=behaviour.status,
                                     headers={"Connection": "close"})
        if behaviour.read_body:
            read = await self._read(request, generation, behaviour.keep_body)
            if read is None:
                return web.Response(status=400, headers={"Connection": "close"})
            body = read
        else:
            body = b""
            self._record(generation, Received(request.method, request.path,
                                              multidict.CIMultiDict(request.headers), b"",
                                              False, 0, query=request.query_string))
        assert self._stopping is not None
        headers = {"x-request-id": "req_fake"}

        if behaviour.fail == "reset_before":
            _abort(request)
            return web.Response()  # writing it fails; aiohttp treats that as a disconnect
        if behaviour.fail == "garbage":
            if request.transport is not None:
                request.transport.write(b"SPLAT \x00\xff not http at all\r\n\r\n")
            _close(request)
            return web.Response()
        if behaviour.fail == "stall_headers":
            await self._stopping.wait()
            _abort(request)
            return web.Response()
        failing = behaviour.status != 200 and (
            behaviour.status_only_for is None or b'name="model"\r\n\r\n' + behaviour.status_only_for + b"\r\n" in body)
        if failing:
            error = {"message": behaviour.error_message or f"fake upstream error {behaviour.status}",
                     "type": "server_error", "param": None, "code": "fake_error"}
            return web.json_response({"error": error}, status=behaviour.status,
                                     headers={**headers, **(behaviour.error_headers or {})})

        if route == "speech":
            chunk = (MP3_FRAME * (behaviour.speech_chunk_bytes // len(MP3_FRAME) + 1))
            chunks = [chunk[:behaviour.speech_chunk_bytes]] * behaviour.speech_chunks
            if _SSE_SPEECH.search(body):  # stream_format "sse": the same audio as events, then the usage
                events = [{"type": "speech.audio.delta", "audio": base64.b64encode(c).decode()} for c in chunks]
                events.append({"type": "speech.audio.done", "usage": SPEECH_USAGE})
                frames = [f"data: {json.dumps(event)}\n\n".encode() for event in events]
                return await self._stream(request, behaviour, generation, "text/event-stream", frames, headers)
            return await self._stream(request, behaviour, generation, "audio/mpeg", chunks,
                                      headers)
        fmt = _RESPONSE_FORMAT.search(body)
        stream = _STREAM.search(body)
        text = behaviour.transcript
        if route == "transcriptions" and stream and stream[1] == b"true":
            words = text.split(" ")
            usage = {"type": "tokens", "input_tokens": 10, "output_tokens": 5, "total_tokens": 15}
            events = [{"type": "transcript.text.delta", "delta": word + " "} for word in words]
            events.append({"type": "transcript.text.done", "text": text, "usage": usage})
            frames = [f"data: {json.dumps(event)}\n\n".encode() for event in events]
            return await self._stream(request, behaviour, generation, "text/event-stream",
                                      frames, headers)
        if fmt and fmt[1].decode() in ("text", "srt", "vtt"):
            content_type, payload = "text/plain", text.encode() + b"\n"
        else:
            content_type = "application/json"
            payload = json.dumps({"text": text, "usage": {
                "type": "tokens", "input_tokens": 10, "output_tokens": 5, "total_tokens": 15,
            }, **(behaviour.answer_fields or {})}).encode()
        if behaviour.fail is None:
            return web.Response(body=payload, content_type=content_type, headers=headers)
        # A fixed-length answer cut short: half the body, then the failure.
        half = len(payload) // 2
        return await self._stream(request, behaviour, generation, content_type,
                                  [payload[:half], payload[half:]], headers, len(payload))

    async def _stream(self, request: web.Request, behaviour: Behaviour, generation: int,
                      content_type: str, chunks: list[bytes], headers: dict[str, str],
                      length: int | None = None) -> web.StreamResponse:
        assert self._stopping is not None
        with self._cond:
            if generation == self._generation:
                self.sent_at.clear()
        response = web.StreamResponse(headers=headers)
        response.content_type = content_type
        if length is None and behaviour.content_length:
            length = sum(map(len, chunks))
        if length is not None:
            response.content_length = length
        else:
            response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            for index, chunk in enumerate(chunks):
                if index and behaviour.chunk_delay:
                    await asyncio.sleep(behaviour.chunk_delay)
                await response.write(chunk)
                await request.writer.drain()
                self._sent(generation)
                if index == 0 and behaviour.fail == "reset_mid":
                    _abort(request)
                    return response
                if index == 0 and behaviour.fail == "stall":
                    await self._stopping.wait()
                    _abort(request)
                    return response
            await response.write_eof()
        except ConnectionError:  # the client left mid-answer; nothing to report to it
            pass
        return response


class SocketUpstream:
    """A raw upstream on 127.0.0.1, port 0: a thread accepts, one thread serves each connection
    (``_serve(conn, number)``, numbered from 1). For faults and answers aiohttp will not make."""

    def __init__(self, rcvbuf: int | None = None) -> None:
        self.connections = 0
        self._listener = socket.socket()
        if rcvbuf is not None:  # set before listen: accepted sockets inherit it (no autotuning)
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._accept = threading.Thread(target=self._run, daemon=True)
        self._accept.start()

    def stop(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._accept.join(5)
        for conn in self._conns:  # wakes the threads still waiting on a gateway that holds on
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        raise NotImplementedError


class CannedUpstream(SocketUpstream):
    """Reads each request (its head, then a body by its Content-Length) and answers it with
    ``body`` labelled ``content_type``, then closes: for labels aiohttp's fake would not send."""

    def __init__(self, content_type: str, body: bytes) -> None:
        self.content_type, self.body = content_type, body
        super().__init__()

    def _serve(self, conn: socket.socket, number: int) -> None:
        with conn:
            f = conn.makefile("rb")
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            f.read(length)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % (self.content_type.encode(), len(self.body)) + self.body)
