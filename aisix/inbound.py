"""The caller's body as it arrives: read chunk by chunk as sent, counted, capped at the body limit,
and timed by the request's deadline.

On audio routes a body is never handed to aiohttp's whole-body or form readers, and
``client_max_size`` does not cover streamed reads, so the count and the cap are here.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import errors
from .deadline import CLIENT, UPSTREAM, Deadline
from .exchange import Exchange


class Inbound:
    __slots__ = ("_content", "_deadline", "_ex", "_idle", "_limit")

    def __init__(self, request: web.Request, limit: int, deadline: Deadline, idle: float, ex: Exchange) -> None:
        self._content = request.content
        self._limit = limit
        self._deadline = deadline
        self._idle = idle
        self._ex = ex

    async def read(self) -> bytes:
        """The next chunk; b"" at the end of the body. A caller that leaves is a ConnectionError."""
        self._deadline.wait(self._idle, CLIENT)
        try:
            while True:
                # One chunk as aiohttp's parser gave it (readany would join all that are
                # buffered: a copy of up to the whole body). (b"", True) marks the end of an
                # HTTP chunk, not of the body.
                chunk, chunk_end = await self._content.readchunk()
                if chunk or not chunk_end:
                    break
        except HttpProcessingError:
            raise errors.invalid_body() from None
        self._deadline.waiting_on = UPSTREAM
        self._ex.bytes_in += len(chunk)
        if self._limit and self._ex.bytes_in > self._limit:
            raise errors.request_too_large(self._limit)
        return chunk

    async def read_all(self, limit: int) -> bytes:
        data = bytearray()
        while chunk := await self.read():
            data += chunk
            if len(data) > limit:
                raise errors.request_too_large(limit)
        return bytes(data)
