"""The caller's body as it arrives: read chunk by chunk as sent, counted, capped at the body limit,
and timed by the request's deadline.

On audio routes a body is never handed to aiohttp's whole-body or form readers, and
``client_max_size`` does not cover streamed reads, so the count and the cap are here. So is the
``100 Continue`` a caller sending ``Expect: 100-continue`` waits for: it goes out on the first
read, once the pipeline has decided everything it decides before the body (declared length, key,
content coding and type), so a refused caller is answered without being asked for its upload.
"""

from __future__ import annotations

from aiohttp import HttpVersion11, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from . import errors
from .deadline import CLIENT, UPSTREAM, Deadline
from .exchange import Exchange


async def expect(request: web.Request) -> None:
    """Every route's expect handler: nothing at the head (aiohttp's default sends 100 Continue to
    any caller there, before a handler has looked at it); Inbound sends it when the body is read."""


class Inbound:
    __slots__ = ("_content", "_deadline", "_ex", "_idle", "_limit", "_request", "_waits")

    def __init__(self, request: web.Request, limit: int, deadline: Deadline, idle: float, ex: Exchange) -> None:
        self._request = request
        self._waits = request.version == HttpVersion11 and \
            request.headers.get(hdrs.EXPECT, "").lower() == "100-continue"
        self._content = request.content
        self._limit = limit
        self._deadline = deadline
        self._idle = idle
        self._ex = ex

    @property
    def exchange(self) -> Exchange:
        return self._ex

    def taken(self) -> None:
        """The upstream took the last write of bytes stored before (a held head, a replay's copy):
        it has ``stream_idle_timeout_ms`` to take the next, as between the caller's own chunks.
        Without this such bytes were timed by the answer's timeout, however steadily they went."""
        self._deadline.wait(self._idle, UPSTREAM)

    async def read(self) -> bytes:
        """The next chunk; b"" at the end of the body. A caller that leaves is a ConnectionError."""
        self._deadline.wait(self._idle, CLIENT)
        if self._waits:
            self._waits = False
            writer = self._request.writer
            await writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            writer.output_size = 0  # an interim answer: the final one has not started
        try:
            while True:
                # One chunk as aiohttp's parser gave it (readany would join all that are
                # buffered: a copy of up to the whole body). (b"", True) marks the end of an
                # HTTP chunk, not of the body; unless the body is at its end: aiohttp's one
                # shared reader of every bodiless request answers (b"", True) to every read
                # after its first, at once, forever (a loop here would never yield).
                chunk, chunk_end = await self._content.readchunk()
                if chunk or not chunk_end or self._content.at_eof():
                    break
        except HttpProcessingError:
            raise errors.invalid_body() from None
        self._deadline.waiting_on = UPSTREAM
        self._ex.bytes_in += len(chunk)
        if self._limit and self._ex.bytes_in > self._limit:
            raise errors.request_too_large(self._limit)
        return chunk

    async def read_all(self, limit: int) -> bytes:
        first = await self.read()
        # The whole body came in one chunk (the usual small JSON): nothing buffered is left and
        # no more will come. Not is_eof(), which says only that the end has arrived: a body that
        # came in two pieces before the first read was cut to its first (a 400 invalid_json).
        if self._content.at_eof():
            if len(first) > limit:
                raise errors.request_too_large(limit)
            return first
        data = bytearray(first)
        del first
        while len(data) <= limit:
            chunk = await self.read()
            if not chunk:
                return bytes(data)
            data += chunk
        # Over the cap: the buffer goes now, not with this frame (a traceback keeps the frame,
        # and the collector may take a while to free it: a flood of 413s would hold them all).
        del data[:]
        raise errors.request_too_large(limit)
