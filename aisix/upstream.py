"""The upstream client: HTTP/1.1 keep-alive connections on asyncio, answers parsed by llhttp.

Every audio request makes one upstream request, so this is the hottest code after aiohttp's
server. aiohttp's ClientSession spent about 100 us of CPU per proxied request (building a
ClientRequest, its headers and payload objects, a writer task, StreamReader plumbing) where
the gateway needs much less: it sends one POST to a URL known at load time, with headers built
from nothing, and relays the answer's bytes. So the request head is a byte string with its fixed
part cached per (URL, provider key); a small body goes out with it in one write; an upload is
written by one task with flow control; the answer is parsed by llhttp (``httptools``, the
parser of Node.js and uvicorn) straight into a list of chunks the relay takes (http1.py: one
connection's protocol and answer; here: which connection, and the pool's rules).

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
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from . import __version__, errors
from .config import UpstreamSettings
from .http1 import Answer, Body, Conn, LengthMismatch, Origin, UpstreamError, Write

__all__ = ["Answer", "Body", "Pool", "UpstreamError", "Write"]

log = logging.getLogger(__name__)

USER_AGENT = f"aisix/{__version__}"
KEEPALIVE_S = 15.0        # an idle connection older than this is closed, not reused
DNS_TTL_S = 300.0

@dataclass(frozen=True, slots=True)
class _Target:
    origin: Origin
    prefix: bytes  # request line and the headers that never change for this URL and key


def raise_upload_error(answer: Answer, request_id: str) -> None:
    """Raises what the upload's iterator raised, the request's own failure (a bad form, the body
    cap, the caller gone), if it did: an answer cut short by it is not the upstream's failure. A
    length the gateway declared and did not keep is a 500, logged."""
    error, answer.body_error = answer.body_error, None
    if error is None:
        return
    try:
        if isinstance(error, LengthMismatch):
            log.error("request %s: %s; upstream connection aborted", request_id, error)
            raise errors.internal_error() from None
        raise error from None
    finally:
        del error  # the answer's frame is not kept by a traceback that holds the error


class Pool:
    """The connections to every upstream, and the only way a request reaches one."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self._loop = asyncio.get_running_loop()
        self._limit = settings.max_connections
        self._connect_timeout = settings.connect_timeout_ms / 1000
        self._in_use = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._idle: dict[Origin, list[Conn]] = {}
        self._targets: dict[tuple[str, str], _Target] = {}
        # (host, port) -> (the lookup, when it expires); aiohttp's connector had ttl_dns_cache=300
        self._addresses: dict[tuple[str, int], tuple[asyncio.Task[list[tuple[int, tuple]]], float]] = {}
        self._tls: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    # -- requests ---------------------------------------------------------------------------------

    async def send(self, url: str, auth_header: str, request_id: str, content_type: str,
                   accept: str | None, body: bytes | Body, content_length: int | None,
                   sent: Callable[[], None] | None = None) -> Answer:
        """POST the request and return once the answer's headers are in. A bytes body leaves with
        the head in one write, once a connection is had, and ``sent`` is called then. A streamed
        body (an upload) goes out from its own task: the upstream may answer before it has read it
        all. An error raised by the body's iterator (a 400 for a bad upload, a 408, a 499) comes
        out of here as itself when no answer has started."""
        target = self._target(url, auth_header)
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
        conn = self._idle_conn(target.origin) or await self._acquire(target.origin)
        answer = Answer(self._loop, conn, self._done)
        try:
            if isinstance(body, bytes):
                conn.send(b"".join(head))
                if sent is not None:
                    sent()
            else:  # the head leaves with the body's first write
                answer.upload(b"".join(head), body, content_length)
            await answer.head()
        except UpstreamError as lost:
            # The answer keeps it (its head's future) and the upload's error: neither may keep this
            # frame, whose locals hold the answer, or they would be a cycle for the rare full
            # collection to find (http1.Conn.connection_lost says why that matters).
            lost.__traceback__ = None
            answer.close()
            raise_upload_error(answer, request_id)
            raise errors.upstream_unavailable() from None
        except BaseException:
            answer.close()
            raise
        return answer

    def _target(self, url: str, auth_header: str) -> _Target:
        target = self._targets.get((url, auth_header))
        if target is None:
            parts = urlsplit(url)
            tls = parts.scheme == "https"
            host = parts.hostname or ""
            port = parts.port or (443 if tls else 80)
            host_header = f"[{host}]" if ":" in host else host
            if parts.port is not None:
                host_header += f":{parts.port}"
            path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
            if parts.query:  # azure's api-version
                path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
            prefix = (f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\n{auth_header}\r\n"
                      f"Accept-Encoding: identity\r\nUser-Agent: {USER_AGENT}\r\n").encode("ascii")
            # identity: the body is relayed as it came, and Content-Encoding is never relayed
            target = self._targets[(url, auth_header)] = _Target(Origin(host, port, tls), prefix)
        return target

    def forget_targets(self) -> None:
        """After a reload: no provider key outlives the resources that named it."""
        self._targets.clear()

    # -- connections ------------------------------------------------------------------------------

    def _idle_conn(self, origin: Origin) -> Conn | None:
        """An idle connection to origin with its slot taken, when one is free and nobody waits:
        the usual case under load, taken without a coroutine."""
        idle = self._idle.get(origin)
        if not idle or self._in_use >= self._limit or self._waiters:
            return None
        now = self._loop.time()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closed
            if conn.usable and now - conn.idle_since < KEEPALIVE_S:
                self._in_use += 1
                return conn
            conn.abort()
        return None

    async def _acquire(self, origin: Origin) -> Conn:
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
                    if conn.usable and now - conn.idle_since < KEEPALIVE_S:
                        return conn
                    conn.abort()
            return await self._connect(origin)
        except BaseException:
            self._free_slot()
            raise

    async def _connect(self, origin: Origin) -> Conn:
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
                            Conn, address[0], address[1], family=family, ssl=tls,
                            server_hostname=origin.host if tls else None)
                        break
                    except OSError as exc:  # the next address, as aiohttp and curl do
                        error = exc
                else:
                    self._addresses.pop((origin.host, origin.port), None)  # look it up anew next time
                    raise error
        except TimeoutError:
            raise errors.upstream_timeout("connect") from None
        except OSError:  # refused, unreachable, no such host, a TLS failure
            raise errors.upstream_unavailable("connect") from None
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

    def _done(self, conn: Conn, reusable: bool) -> None:
        """A request is over: its connection goes back to the pool or is aborted; its slot is
        handed to the next waiting request or freed."""
        if reusable and conn.usable and not self._closed:
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
            keep = [c for c in conns if c.usable and now - c.idle_since < KEEPALIVE_S]
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
