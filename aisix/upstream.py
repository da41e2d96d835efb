"""The one upstream ClientSession, the headers an upstream gets, and upstream failures as 502/504.

Outbound headers are built from nothing rather than filtered from the caller's: the caller's
``Authorization``, ``x-api-key``, cookies, ``Host`` and hop-by-hop headers cannot leak because
they are never copied.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp

from . import __version__, errors
from .config import Model, UpstreamSettings

USER_AGENT = f"aisix/{__version__}"


class _Connector(aiohttp.TCPConnector):
    """Aborts a connection it will not reuse instead of closing it gracefully.

    A graceful close first flushes what is still buffered: after a 504 or a 499 mid-upload, that
    is the rest of a request body for an upstream that stopped reading, and the socket stayed
    open for as long as the upstream kept it. Nothing unsent is worth sending once the request
    is given up. (``_release`` is aiohttp's own hook for this; aiohttp is pinned below 3.15.)
    """

    def _release(self, key, protocol, *, should_close: bool = False) -> None:  # type: ignore[no-untyped-def]
        if should_close or protocol.should_close or self.force_close:
            protocol.abort()
        super()._release(key, protocol, should_close=should_close)


def create_session(settings: UpstreamSettings) -> aiohttp.ClientSession:
    connect = settings.connect_timeout_ms / 1000
    return aiohttp.ClientSession(
        # aiohttp's defaults would cap us at 100 connections and cut every call at 300 s.
        connector=_Connector(limit=settings.max_connections, limit_per_host=0, ttl_dns_cache=300),
        # Reads are timed by the request's Deadline: the header wait and the idle gap differ.
        timeout=aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect, sock_read=None),
        auto_decompress=False,  # bytes are relayed as they came
        cookie_jar=aiohttp.DummyCookieJar(),  # one caller's upstream cookies must never reach another
        trust_env=False,
        skip_auto_headers=("User-Agent",),
    )


def request_headers(
    model: Model, request_id: str, content_type: str, content_length: int | None, accept: str | None
) -> dict[str, str]:
    headers = {
        "Authorization": model.provider_key.authorization,
        "Content-Type": content_type,
        "Accept-Encoding": "identity",  # we relay the body as it came and never relay Content-Encoding
        "User-Agent": USER_AGENT,
        "x-aisix-request-id": request_id,
    }
    if accept:
        headers["Accept"] = accept
    if content_length is not None:
        headers["Content-Length"] = str(content_length)
    return headers


class BodyStream:
    """An upload body for aiohttp that keeps the real reason when it fails.

    aiohttp wraps an exception raised by a body generator in a ClientConnectionError; the
    gateway needs the original (a 400 for a bad body, a 408 for a silent caller, a 499).
    """

    __slots__ = ("_gen", "error")

    def __init__(self, gen: AsyncIterator[bytes | bytearray | memoryview]) -> None:
        self._gen = gen
        self.error: BaseException | None = None

    async def __aiter__(self) -> AsyncIterator[bytes | bytearray | memoryview]:
        try:
            async for chunk in self._gen:
                yield chunk
        except BaseException as exc:
            self.error = exc
            raise


async def send(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes | BodyStream
) -> aiohttp.ClientResponse:
    """POST the request and return once the answer's headers are in."""
    data = body if isinstance(body, bytes) else body.__aiter__()
    try:
        return await session.post(url, data=data, headers=headers, allow_redirects=False)
    except aiohttp.ClientError as exc:
        if isinstance(body, BodyStream) and body.error is not None:
            raise body.error from None
        if isinstance(exc, TimeoutError):
            raise errors.upstream_timeout() from None
        raise errors.upstream_unavailable() from None
