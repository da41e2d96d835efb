"""The Python floor: an HTTP/1.1 relay with no framework, raw asyncio Protocols on uvloop and
httptools (llhttp) to parse both sides. What a proxy written in Python costs before it does
anything of its own.

Each caller request is parsed as it arrives; its head goes upstream with Host rewritten, its body
follows as it comes (as it was framed: Content-Length, or chunked again when the caller sent it
chunked). The answer's head and body come back the same way. Upstream connections are kept alive
in a small pool. Flow control both ways: a side stops reading while the other side's transport is
over its high-water mark and starts again when it drains. Keep-alive on both sides; pipelined
requests are refused (the connection is closed).

    python bench/raw_relay.py --listen 127.0.0.1:0 --upstream http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from urllib.parse import urlsplit

import httptools
import uvloop

# Headers not passed on: hop-by-hop ones, and the two that the relay itself answers for.
NOT_RELAYED = {b"connection", b"keep-alive", b"proxy-connection", b"host", b"expect"}


class Side(asyncio.Protocol):
    """What both ends share: a parser, the message's headers, and what is read but not yet written
    to the other end (one writelines per data_received)."""

    def __init__(self, parser: type[httptools.HttpRequestParser | httptools.HttpResponseParser]) -> None:
        self.parser = parser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.out: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.write_paused = False  # this transport is over its high-water mark

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def head(self, first_line: bytes, last: bytes) -> None:
        """The message's head for the other end, most headers as they came."""
        head = [first_line]
        self.chunked = False
        for name, value in self.headers:
            low = name.lower()
            if low in NOT_RELAYED:
                continue
            if low == b"transfer-encoding":
                self.chunked = True  # llhttp hands over the chunks' contents: frame them again
            head.append(b"%s: %s\r\n" % (name, value))
        head.append(last + b"\r\n")
        self.out.append(b"".join(head))

    def on_body(self, body: bytes) -> None:
        if self.chunked:
            self.out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self.out.append(body)

    def end(self) -> None:
        if self.chunked:
            self.out.append(b"0\r\n\r\n")


class Pool:
    """Idle keep-alive connections to the upstream, most recently used first."""

    def __init__(self, host: str, port: int, keep: int = 256) -> None:
        self.host, self.port, self.keep = host, port, keep
        self.host_header = f"Host: {host}:{port}\r\n".encode()
        self.idle: list[Upstream] = []

    def take(self) -> Upstream | None:
        while self.idle:
            up = self.idle.pop()
            if not up.transport.is_closing():
                return up
        return None

    async def connect(self) -> Upstream:
        _, up = await asyncio.get_running_loop().create_connection(lambda: Upstream(self), self.host, self.port)
        return up

    def give_back(self, up: Upstream) -> None:
        if len(self.idle) < self.keep and not up.transport.is_closing():
            self.idle.append(up)
        else:
            up.transport.close()


class Caller(Side):
    """One caller connection; its requests are relayed one at a time."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(httptools.HttpRequestParser)
        self.pool = pool
        self.up: Upstream | None = None
        self.url = b""
        self.busy = False        # a request is being relayed, its answer not finished
        self.read_whole = False  # the request has been read to its end
        self.keep_alive = True
        self.connecting: asyncio.Task[None] | None = None
        self.reading_paused = False

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:  # a bad request, or a pipelined one while busy
            if self.busy:
                self.transport.close()
            else:
                self.refuse(b"400 Bad Request")
        if self.up is not None and self.out:
            self.up.transport.writelines(self.out)
            self.out = []

    def on_message_begin(self) -> None:
        if self.busy:
            raise RuntimeError("pipelined request")  # httptools raises HttpParserCallbackError
        self.busy, self.read_whole, self.url, self.headers = True, False, b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        if any(name.lower() == b"expect" for name, _ in self.headers):  # the body streams anyway
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.head(b"%s %s HTTP/1.1\r\n" % (self.parser.get_method(), self.url), self.pool.host_header)
        up = self.pool.take()
        if up is not None:
            self.attach(up)
        else:
            self.connecting = asyncio.get_running_loop().create_task(self.connect())
            self.update_reading()

    def on_message_complete(self) -> None:
        self.end()
        self.read_whole = True

    async def connect(self) -> None:
        try:
            up = await self.pool.connect()
        except OSError:
            self.refuse(b"502 Bad Gateway")
            return
        finally:
            self.connecting = None
        if self.transport.is_closing():
            up.transport.close()
            return
        self.attach(up)
        if self.out:
            up.transport.writelines(self.out)
            self.out = []

    def attach(self, up: Upstream) -> None:
        self.up, up.caller, up.head_sent, up.done = up, self, False, False
        if self.write_paused:
            up.transport.pause_reading()
        self.update_reading()

    def update_reading(self) -> None:
        """Read from the caller unless its upstream is not there yet or is over its high-water mark."""
        pause = self.connecting is not None or (self.up is not None and self.up.write_paused)
        if pause != self.reading_paused:
            self.reading_paused = pause
            (self.transport.pause_reading if pause else self.transport.resume_reading)()

    def answered(self, up: Upstream) -> None:
        """The whole answer has been written to this caller."""
        self.up, up.caller, self.busy = None, None, False
        if self.read_whole and up.parser.should_keep_alive():
            up.transport.resume_reading()  # it may have been paused for this caller
            self.pool.give_back(up)
        else:
            up.transport.close()
        if not (self.keep_alive and self.read_whole):
            self.transport.close()  # after what is buffered has been written
        self.update_reading()

    def upstream_lost(self, answer_started: bool) -> None:
        self.up = None
        if answer_started:
            self.transport.close()  # cut short: the caller sees the answer end early
        else:
            self.refuse(b"502 Bad Gateway")

    def refuse(self, status: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % status)
            self.transport.close()

    def pause_writing(self) -> None:  # the answer's flow control
        self.write_paused = True
        if self.up is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.up is not None:
            self.up.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
        if self.up is not None:  # mid-request or mid-answer: that connection cannot be reused
            self.up.caller = None
            self.up.transport.close()
            self.up = None


class Upstream(Side):
    """One keep-alive connection to the upstream, serving one caller's request at a time."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(httptools.HttpResponseParser)
        self.pool = pool
        self.caller: Caller | None = None
        self.reason = b""
        self.head_sent = False
        self.done = False

    def data_received(self, data: bytes) -> None:
        caller = self.caller
        if caller is None:  # nothing was asked
            self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # connection_lost tells the caller
            return
        if self.out:
            caller.transport.writelines(self.out)
            self.out = []
        if self.done:
            caller.answered(self)

    def on_message_begin(self) -> None:
        self.reason, self.headers = b"", []

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_headers_complete(self) -> None:
        assert self.caller is not None
        self.head(b"HTTP/1.1 %d %s\r\n" % (self.parser.get_status_code(), self.reason),
                  b"" if self.caller.keep_alive else b"Connection: close\r\n")
        self.head_sent = True

    def on_message_complete(self) -> None:
        self.end()
        self.done = True

    def pause_writing(self) -> None:  # the request body's flow control
        self.write_paused = True
        if self.caller is not None:
            self.caller.update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.caller is not None:
            self.caller.update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        if self.caller is not None:
            self.caller.upstream_lost(self.head_sent)
            self.caller = None


async def serve(host: str, port: int, upstream: str) -> None:
    url = urlsplit(upstream)
    pool = Pool(url.hostname or "127.0.0.1", url.port or 80)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Caller(pool), host, port, backlog=4096)
    address, bound = server.sockets[0].getsockname()[:2]
    print(f"raw relay listening on http://{address}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    for up in pool.idle:
        up.transport.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    uvloop.run(serve(host, int(port), args.upstream))
