"""The upstream client: HTTP/1.1 keep-alive connections on asyncio, answers parsed by llhttp.

Every audio request makes one upstream request, so this is the hottest code after aiohttp's
server. aiohttp's ClientSession spent about 100 us of CPU per proxied request (building a
ClientRequest, its headers and payload objects, a writer task, StreamReader plumbing) where
the gateway needs much less: it sends one POST to a URL known at load time, with headers built
from nothing, and relays the answer's bytes. So the request head is a byte string with its fixed
part cached per (URL, provider key); a small body goes out with it in one write; an upload is
written by one task with flow control; the answer is parsed by llhttp (``httptools``, the
parser of Node.js and uvicorn) straight into a list of chunks the relay takes.

Outbound headers are built from nothing rather than filtered from the caller's: the caller's
``Authorization``, ``x-api-key``, cookies, ``Host`` and hop-by-hop headers cannot leak because
they are never copied. A connection is reused only after a complete answer to a completely
sent request; any other ending aborts it (an RST, no flush of an unsent upload to an upstream
that stopped reading). ``max_connections`` caps the requests in flight upstream (connections
in use); idle connections are closed after ``KEEPALIVE_S``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from . import __version__, errors
from .config import UpstreamSettings

USER_AGENT = f"aisix/{__version__}"
KEEPALIVE_S = 15.0        # an idle connection older than this is closed, not reused
HIGH_WATER = 256 * 1024   # answer bytes buffered before the socket stops being read
MAX_HEAD = 64 * 1024      # answer status line and headers, in all
MAX_HEADERS = 256
DNS_TTL_S = 300.0

Body = AsyncIterator[list[bytes | bytearray | memoryview]]  # an upload, as writes


class UpstreamError(ConnectionError):
    """The upstream connection broke, or what came back is not HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class _Origin:
    host: str
    port: int
    tls: bool


@dataclass(frozen=True, slots=True)
class _Target:
    origin: _Origin
    prefix: bytes  # request line and the headers that never change for this URL and key


class Pool:
    """The connections to every upstream, and the only way a request reaches one."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self._loop = asyncio.get_running_loop()
        self._limit = settings.max_connections
        self._connect_timeout = settings.connect_timeout_ms / 1000
        self._in_use = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._idle: dict[_Origin, list[_Conn]] = {}
        self._targets: dict[tuple[str, str], _Target] = {}
        # (host, port) -> (the lookup, when it expires); aiohttp's connector had ttl_dns_cache=300
        self._addresses: dict[tuple[str, int], tuple[asyncio.Task[list[tuple[int, tuple]]], float]] = {}
        self._tls: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    # -- requests ---------------------------------------------------------------------------------

    async def send(self, url: str, authorization: str, request_id: str, content_type: str,
                   accept: str | None, body: bytes | Body, content_length: int | None) -> Answer:
        """POST the request and return once the answer's headers are in. A streamed body (an
        upload) goes out from its own task: the upstream may answer before it has read it all.
        An error raised by the body's iterator (a 400 for a bad upload, a 408, a 499) comes out
        of here as itself when no answer has started."""
        target = self._target(url, authorization)
        head = [target.prefix, b"Content-Type: ", _field(content_type), b"\r\nx-aisix-request-id: ",
                request_id.encode("ascii")]
        if accept:
            head += (b"\r\nAccept: ", _field(accept))
        if isinstance(body, bytes):
            head += (b"\r\nContent-Length: ", b"%d" % len(body), b"\r\n\r\n", body)
        elif content_length is not None:
            head += (b"\r\nContent-Length: ", b"%d" % content_length, b"\r\n\r\n")
        else:
            head.append(b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn = await self._acquire(target.origin)
        answer = Answer(self, conn)
        try:
            if isinstance(body, bytes):
                conn.send(b"".join(head))
            else:  # the head leaves with the body's first write
                answer._writer = self._loop.create_task(answer._write(b"".join(head), body, content_length is None))
            await answer._headers
        except UpstreamError:
            answer.close()
            if answer.body_error is not None:
                raise answer.body_error from None
            raise errors.upstream_unavailable() from None
        except BaseException:
            answer.close()
            raise
        return answer

    def _target(self, url: str, authorization: str) -> _Target:
        target = self._targets.get((url, authorization))
        if target is None:
            parts = urlsplit(url)
            tls = parts.scheme == "https"
            host = parts.hostname or ""
            port = parts.port or (443 if tls else 80)
            host_header = f"[{host}]" if ":" in host else host
            if parts.port is not None:
                host_header += f":{parts.port}"
            path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
            prefix = (f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\nAuthorization: {authorization}\r\n"
                      f"Accept-Encoding: identity\r\nUser-Agent: {USER_AGENT}\r\n").encode("ascii")
            # identity: the body is relayed as it came, and Content-Encoding is never relayed
            target = self._targets[(url, authorization)] = _Target(_Origin(host, port, tls), prefix)
        return target

    def forget_targets(self) -> None:
        """After a reload: no provider key outlives the resources that named it."""
        self._targets.clear()

    # -- connections ------------------------------------------------------------------------------

    async def _acquire(self, origin: _Origin) -> _Conn:
        if self._in_use < self._limit and not self._waiters:
            self._in_use += 1
        else:
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # a finished request hands its slot over
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._free_slot()  # handed over just as this request gave up: pass it on
                else:
                    self._waiters.remove(waiter)
                raise
        try:
            idle = self._idle.get(origin)
            if idle:
                now = self._loop.time()
                while idle:
                    conn = idle.pop()  # the most recently used: the least likely to be closed
                    if not conn.closed and now - conn.idle_since < KEEPALIVE_S:
                        return conn
                    conn.abort()
            return await self._connect(origin)
        except BaseException:
            self._free_slot()
            raise

    async def _connect(self, origin: _Origin) -> _Conn:
        loop = self._loop
        tls = None
        if origin.tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            async with asyncio.timeout(self._connect_timeout):
                error: OSError = OSError("no address")
                for family, address in await self._resolve(origin.host, origin.port):
                    try:
                        _, conn = await loop.create_connection(
                            _Conn, address[0], address[1], family=family, ssl=tls,
                            server_hostname=origin.host if tls else None)
                        break
                    except OSError as exc:  # the next address, as aiohttp and curl do
                        error = exc
                else:
                    self._addresses.pop((origin.host, origin.port), None)  # look it up anew next time
                    raise error
        except TimeoutError:
            raise errors.upstream_timeout() from None
        except OSError:  # refused, unreachable, no such host, a TLS failure
            raise errors.upstream_unavailable() from None
        conn.origin = origin
        if self._sweeper is None and not self._closed:
            self._sweeper = loop.call_later(KEEPALIVE_S, self._sweep)
        return conn

    async def _resolve(self, host: str, port: int) -> list[tuple[int, tuple]]:
        """The host's addresses, looked up at most once per DNS_TTL_S; lookups under way for
        the same host are shared (a burst of new connections makes one getaddrinfo, not one
        per connection on a small thread pool). A failed lookup is not remembered."""
        key = (host, port)
        entry = self._addresses.get(key)
        if entry is None or (entry[0].done() and self._loop.time() >= entry[1]):
            lookup = self._loop.create_task(self._lookup(key))
            lookup.add_done_callback(_retrieved)
            entry = self._addresses[key] = (lookup, self._loop.time() + DNS_TTL_S)
        return await asyncio.shield(entry[0])  # one caller leaving does not cancel the others' lookup

    async def _lookup(self, key: tuple[str, int]) -> list[tuple[int, tuple]]:
        try:
            infos = await self._loop.getaddrinfo(key[0], key[1], type=socket.SOCK_STREAM)
        except BaseException:
            entry = self._addresses.get(key)
            if entry is not None and entry[0] is asyncio.current_task():
                del self._addresses[key]
            raise
        return [(family, address) for family, _, _, _, address in infos]

    def _done(self, conn: _Conn, reusable: bool) -> None:
        """A request is over: its connection goes back to the pool or is aborted; its slot is
        handed to the next waiting request or freed."""
        if reusable and not conn.closed and not self._closed:
            conn.answer = None
            conn.idle_since = self._loop.time()
            self._idle.setdefault(conn.origin, []).append(conn)
        else:
            conn.abort()
        self._free_slot()

    def _free_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._in_use -= 1

    def _sweep(self) -> None:
        loop = self._loop
        now = loop.time()
        for origin, conns in list(self._idle.items()):
            keep = [c for c in conns if not c.closed and now - c.idle_since < KEEPALIVE_S]
            for c in conns:
                if c not in keep:
                    c.abort()
            if keep:
                self._idle[origin] = keep
            else:
                del self._idle[origin]
        self._sweeper = loop.call_later(KEEPALIVE_S, self._sweep) if self._idle else None

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        self._idle.clear()
        for lookup, _ in self._addresses.values():
            lookup.cancel()


def _retrieved(task: asyncio.Task) -> None:
    """A lookup's failure is seen by whoever awaits it; none may be left to see it."""
    if not task.cancelled():
        task.exception()


def _field(value: str) -> bytes:
    """A header value as it came, refused if it could end the line."""
    data = value.encode("utf-8", "surrogateescape")
    if b"\r" in data or b"\n" in data or b"\0" in data:
        raise errors.invalid_request("invalid_header", "A header value contains a line break.")
    return data


class _Conn(asyncio.Protocol):
    """One upstream connection: the socket's events and llhttp's, for the answer under way."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set on connect
        self.answer: Answer | None = None
        self.closed = False
        self.idle_since = 0.0
        self.origin: _Origin | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._head_size = 0
        self._interim = False
        self._paused = False       # writing: the socket's send buffer is full
        self._drain: asyncio.Future[None] | None = None

    # -- the socket -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
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
        except Exception:  # llhttp's errors, and ours from its callbacks (headers too large)
            answer._fail(UpstreamError("the upstream's answer is not valid HTTP/1.1"))
            self.abort()

    def eof_received(self) -> bool:
        return False  # close the connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.answer is not None:
            self.answer._lost(exc)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(UpstreamError("the upstream closed the connection"))

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

    def send(self, *data: bytes | bytearray | memoryview) -> None:
        """One write (a writev for several pieces); UpstreamError once the socket is closing."""
        transport = self.transport
        if self.closed or transport.is_closing():
            raise UpstreamError("the upstream closed the connection")
        try:
            transport.writelines(data) if len(data) > 1 else transport.write(data[0])
        except (RuntimeError, OSError):  # closed under us, between the check and the write
            raise UpstreamError("the upstream closed the connection") from None

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- llhttp's callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._head_size = 0
        self.answer._raw_headers = []  # type: ignore[union-attr]

    def on_header(self, name: bytes, value: bytes) -> None:
        answer = self.answer
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD or len(answer._raw_headers) >= MAX_HEADERS:  # type: ignore[union-attr]
            raise UpstreamError("the upstream's answer headers are too large")
        answer._raw_headers.append((name.decode("latin-1"), value.decode("latin-1")))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # 100 Continue, 103 Early Hints: the answer is still to come
            self._interim = True
            return
        self.answer._head(status, self._parser.should_keep_alive())  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        self.answer._feed(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.answer._complete()  # type: ignore[union-attr]


class Answer:
    """An upstream answer: status and headers at once, the body as it arrives."""

    __slots__ = ("status", "headers", "body_error", "complete", "_pool", "_conn", "_headers", "_raw_headers",
                 "_keep_alive", "_chunks", "_buffered", "_error", "_waiter", "_writer", "_eof_ends", "_finished")

    def __init__(self, pool: Pool, conn: _Conn) -> None:
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.body_error: BaseException | None = None  # what the upload's iterator raised
        self.complete = False
        self._pool = pool
        self._conn = conn
        self._headers: asyncio.Future[None] = pool._loop.create_future()
        self._raw_headers: list[tuple[str, str]] = []
        self._keep_alive = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._eof_ends = False  # no Content-Length, not chunked: the body ends with the connection
        self._finished = False
        conn.answer = self

    async def read(self) -> bytes:
        """The body bytes that have arrived (waiting for some); b"" at its end."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                if self._buffered >= HIGH_WATER and not self._conn.closed:
                    self._conn.transport.resume_reading()
                self._buffered = 0
                return data
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            self._waiter = self._pool._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

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
        self._pool._done(self._conn, self.complete and self._keep_alive and sent and self._error is None)

    def close(self) -> None:
        """Give up on this answer: the connection is aborted."""
        if self._finished:
            return
        self._finished = True
        self._headers.cancel()
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        self._pool._done(self._conn, False)

    # -- from the connection ----------------------------------------------------------------------

    def _head(self, status: int, keep_alive: bool) -> None:
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict(self._raw_headers))
        self._keep_alive = keep_alive
        self._eof_ends = ("Content-Length" not in self.headers
                          and "chunked" not in self.headers.get("Transfer-Encoding", "").lower()
                          and status not in (204, 304))
        if not self._headers.done():
            self._headers.set_result(None)

    def _feed(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered >= HIGH_WATER:
            self._conn.transport.pause_reading()
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

    async def _write(self, head: bytes, body: Body, chunked: bool) -> None:
        """The upload, one writev per write its iterator yields, at the pace the upstream reads."""
        conn = self._conn
        writes = body.__aiter__()
        try:
            while True:
                try:
                    pieces = await writes.__anext__()
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:  # the caller's side of the upload failed
                    self.body_error = exc
                    self._fail(UpstreamError("the upload was given up"))
                    conn.abort()
                    return
                if chunked:
                    size = sum(map(len, pieces))
                    pieces = [b"%x\r\n" % size, *pieces, b"\r\n"] if size else []
                if head:
                    pieces = [head, *pieces]
                    head = b""
                if pieces:
                    conn.send(*pieces)
                if conn._paused:
                    await conn.drain()
            if head or chunked:
                conn.send(head + b"0\r\n\r\n" if chunked else head)
        except UpstreamError:
            pass  # lost while waiting to write: the answer's reader says so
        finally:
            aclose = getattr(writes, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
