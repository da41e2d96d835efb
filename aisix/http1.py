"""HTTP/1.1 on one upstream connection: the socket's protocol, llhttp's callbacks, the answer.

``Conn`` is an asyncio protocol whose bytes go to llhttp (``httptools``, the parser of Node.js and
uvicorn); the ``Answer`` under way gets the status and headers, then the body as a list of
chunks the relay takes (the socket pauses past ``HIGH_WATER`` unread), and writes an upload
with flow control. Which connection to use, and what becomes of it after, is upstream.Pool's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

HIGH_WATER = 256 * 1024   # answer bytes buffered before the socket stops being read
MAX_HEAD = 64 * 1024      # answer status line and headers (1xx heads included), in all
MAX_HEADERS = 256

Write = list[bytes | bytearray | memoryview]  # one writev
Body = AsyncIterator[Write]  # an upload, as writes


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a connection leads: the pool keeps idle connections per origin."""

    host: str
    port: int
    tls: bool


class UpstreamError(ConnectionError):
    """The upstream connection broke, or what came back is not HTTP/1.1."""


class _Unasked(Exception):
    """Bytes of an answer nobody asked for."""


class LengthMismatch(Exception):
    """An upload that does not match the Content-Length its head declared: a bug, never a
    caller's doing (the server checks the caller's framing); the connection is aborted."""


class Conn(asyncio.Protocol):
    """One upstream connection: the socket's events and llhttp's, for the answer under way."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None  # set on connect
        self.answer: Answer | None = None
        self.closed = False
        self.idle_since = 0.0
        self.origin = Origin("", 0, False)  # set by the pool once connected
        self._parser = httptools.HttpResponseParser(self)
        self._head_size = 0
        self._raw_headers: list[tuple[str, str]] = []
        self._unanswered = 0       # bytes of the answer under way before its final head
        self._interim = False
        self._paused = False       # writing: the socket's send buffer is full
        self._drain: asyncio.Future[None] | None = None

    # -- the socket -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        answer = self.answer
        if answer is None or answer.complete:
            self.abort()  # bytes nobody asked for: this connection can no longer be trusted
            return
        try:
            self._parser.feed_data(data)
            # on_header bounds a head that arrives whole; this one that never ends (no line to count)
            if not answer.status:
                self._unanswered += len(data)
                if self._unanswered > MAX_HEAD:
                    raise UpstreamError("the upstream's answer head is too large")
        except Exception:  # llhttp's errors, and ours (heads too large, _Unasked), which llhttp wraps in its own
            if not answer.complete:  # a whole answer stays whole: only what came after it is refused
                answer._fail(UpstreamError("the upstream's answer is not valid HTTP/1.1"))
            self.abort()  # what came after it must not meet the next request

    def eof_received(self) -> bool:
        return False  # close the connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        answer, self.answer = self.answer, None
        if answer is not None:
            answer._lost(exc)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(UpstreamError("the upstream closed the connection"))
        # The parser calls back into this protocol, the answer and the transport point back at
        # it: with those links cut it is freed when the last request lets go of it, not at the
        # next full collection (rare by design: server._steady_gc), which let every connection a
        # caller's leaving aborted hold its buffers meanwhile (RSS +20 MiB under wrk's rounds).
        self.transport = None
        del self._parser

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drain(self) -> None:
        if self._paused and not self.closed:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain
        if self.closed:
            raise UpstreamError("the upstream closed the connection")

    @property
    def usable(self) -> bool:
        """Neither closed nor closing: a connection whose close waits on a flush (the upstream
        hung up with some of an upload unread) is as good as gone, though not lost yet."""
        transport = self.transport
        return not self.closed and transport is not None and not transport.is_closing()

    @property
    def paused(self) -> bool:
        """The socket's send buffer is full: drain() before the next write."""
        return self._paused

    def begin(self, answer: Answer) -> None:
        """A request is going out on this connection: its answer is the one under way."""
        self.answer = answer
        self._unanswered = 0

    def send(self, *data: bytes | bytearray | memoryview) -> None:
        """One write (a writev for several pieces); UpstreamError once the socket is closing."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise UpstreamError("the upstream closed the connection")
        try:
            transport.writelines(data) if len(data) > 1 else transport.write(data[0])
        except (RuntimeError, OSError):  # closed under us, between the check and the write
            raise UpstreamError("the upstream closed the connection") from None

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- llhttp's callbacks -----------------------------------------------------------------------

    def _under_way(self) -> Answer:
        answer = self.answer
        if answer is None:  # data_received drops bytes nobody asked for before llhttp sees them
            raise UpstreamError("an answer with no request")
        return answer

    def on_message_begin(self) -> None:
        if self._under_way().complete:  # a second answer in the same read as the first
            raise _Unasked
        self._head_size = 0
        self._raw_headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD or len(self._raw_headers) >= MAX_HEADERS:
            raise UpstreamError("the upstream's answer headers are too large")
        self._raw_headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if not 100 <= status <= 599:  # llhttp takes any three digits; RFC 9110 (15) only these
            raise UpstreamError("the upstream's answer status is not an HTTP status")
        if 100 <= status < 200:  # 100 Continue, 103 Early Hints: the answer is still to come
            self._interim = True
            return
        self._under_way()._head(status, self._parser.should_keep_alive(), self._raw_headers)

    def on_body(self, body: bytes) -> None:
        self._under_way()._feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._under_way()._complete()


# An answer's coding headers: what each may name besides nothing, and what it is called otherwise.
_CODINGS = (("Transfer-Encoding", "chunked", "transfer coding besides chunked"),
            ("Content-Encoding", "identity", "content coding though none was asked for"))


class Answer:
    """An upstream answer: status and headers at once, the body as it arrives."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_done", "_eof_ends", "_error", "_finished", "_headers",
                 "_keep_alive", "_loop", "_waiter", "_writer", "body_error", "complete", "headers", "status")

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: Conn, done: Callable[[Conn, bool], None]) -> None:
        """done(conn, reusable) is called once, when the answer is released or closed."""
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.body_error: BaseException | None = None  # what the upload's iterator raised
        self.complete = False
        self._loop = loop
        self._done = done
        self._conn = conn
        self._headers: asyncio.Future[None] = loop.create_future()
        self._keep_alive = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._eof_ends = False  # no Content-Length, not chunked: the body ends with the connection
        self._finished = False
        conn.begin(self)

    def head(self) -> asyncio.Future[None]:
        """What to await for the status and headers (UpstreamError if the connection fails first):
        the future itself, not a coroutine around it (one frame less to resume)."""
        return self._headers

    def upload(self, head: bytes, body: Body, length: int | None) -> None:
        """Write the request head and then the body from a task of its own, at the pace the
        upstream reads: the upstream may answer before it has read it all."""
        self._writer = self._loop.create_task(self._write(head, body, length))

    async def read(self) -> bytes:
        """The body bytes that have arrived (waiting for some); b"" at its end."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                if self._buffered >= HIGH_WATER:
                    self._conn.resume_reading()
                self._buffered = 0
                return data
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @property
    def ready(self) -> bool:
        """Body bytes (or its end) are here already: a read() would not wait."""
        return bool(self._chunks) or self.complete or self._error is not None

    def release(self) -> None:
        """The body was read to its end: the connection may serve the next request."""
        if self._finished:
            return
        self._finished = True
        self._headers.cancel()  # no-op once the headers are in; otherwise nobody will await it
        writer = self._writer
        sent = writer is None or (writer.done() and not writer.cancelled() and self.body_error is None)
        if writer is not None and not writer.done():
            writer.cancel()
        whole = self.complete and self._keep_alive and self._error is None
        self._done(self._conn, whole and sent and self._conn.usable)

    def close(self) -> None:
        """Give up on this answer: the connection is aborted."""
        if self._finished:
            return
        self._finished = True
        self._headers.cancel()
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        self._done(self._conn, False)

    # -- from the connection ----------------------------------------------------------------------

    def _head(self, status: int, keep_alive: bool, raw_headers: list[tuple[str, str]]) -> None:
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict(raw_headers))
        self._keep_alive = keep_alive
        # Codings none asked for (Accept-Encoding: identity): none is undone, nor is the caller told of one.
        for header, plain, what in _CODINGS:
            for value in self.headers.getall(header, ()):
                if any(coding.strip().lower() not in (plain, "") for coding in value.split(",")):
                    raise UpstreamError(f"the upstream's answer has a {what}")
        self._eof_ends = ("Content-Length" not in self.headers
                          and "chunked" not in self.headers.get("Transfer-Encoding", "").lower()
                          and status not in (204, 304))
        if not self._headers.done():
            self._headers.set_result(None)

    def _feed(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered >= HIGH_WATER:
            self._conn.pause_reading()
        self._wake()

    def _complete(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if not self._headers.done():
            self._headers.set_exception(exc)
        self._wake()

    def _lost(self, exc: Exception | None) -> None:
        if self.complete:
            return
        if exc is None and self._headers.done() and self._eof_ends:
            self._complete()  # the body ran to a clean end of the connection, as announced
            self._keep_alive = False
        else:  # a reset is never the end of a body, whatever framed it
            self._fail(UpstreamError("the upstream closed the connection before its answer was complete"))

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _write(self, head: bytes, body: Body, length: int | None) -> None:
        """The upload, one writev per write its iterator yields, at the pace the upstream reads.

        ``length`` is the Content-Length the head declared (None: chunked). What is written is
        counted against it: a body that would go past it, or ends short of it, aborts the
        connection before the difference can be read as the start of the next request."""
        conn = self._conn
        writes = body.__aiter__()
        left = length
        exhausted = False
        try:
            while True:
                try:
                    pieces = await writes.__anext__()
                except StopAsyncIteration:
                    exhausted = True
                    break
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:  # the caller's side of the upload failed
                    # Kept for the pipeline without this frame, whose locals hold this answer, and
                    # without the locals of the ended frames below it: a traceback that still says
                    # where, and no cycle (exception, frame, answer) left for the rare full
                    # collection to find (Conn.connection_lost says why that matters).
                    below = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
                    if below is not None:
                        traceback.clear_frames(below)
                    self._give_up(exc.with_traceback(below))
                    return
                size = sum(map(len, pieces))
                if left is None:
                    pieces = [b"%x\r\n" % size, *pieces, b"\r\n"] if size else []
                else:
                    left -= size
                    if left < 0:
                        self._give_up(LengthMismatch(f"the upload went past its Content-Length of {length} bytes"))
                        return
                if head:
                    pieces = [head, *pieces]
                    head = b""
                if pieces:
                    conn.send(*pieces)
                if conn.paused:
                    await conn.drain()
            if left:
                self._give_up(LengthMismatch(f"the upload ended {left} bytes short of its Content-Length"))
                return
            if head or left is None:
                conn.send(head + b"0\r\n\r\n" if left is None else head)
        except UpstreamError:
            pass  # lost while waiting to write: the answer's reader says so
        finally:
            # An iterator run to its end has closed itself (most requests: no await, no context
            # manager here); one left part-way is closed now.
            aclose = None if exhausted else getattr(writes, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()

    def _give_up(self, exc: BaseException) -> None:
        """The upload cannot be finished as declared: the connection is aborted, never reused."""
        self.body_error = exc
        self._fail(UpstreamError("the upload was given up"))
        self._conn.abort()


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
