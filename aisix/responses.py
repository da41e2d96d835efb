"""The request id and the error envelope around every route's handler, so no route can skip
either; and the headers every response of ours carries.

A wrapper made once per route at startup rather than an aiohttp middleware plus an
``on_response_prepare`` hook: both run per request through aiohttp's generic machinery (a
middleware chain, a signal that builds a coroutine per receiver), and this does the same work
for less. Paths and methods no route serves get the envelope from a catch-all route.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import HttpVersion11, hdrs, web

from . import access_log, errors
from .cors import Cors
from .exchange import new_id
from .keys import LIVE, REQUEST_ID, SETTINGS

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_id(request: web.Request, names: tuple[str, ...]) -> str:
    """The caller's id when it is 1-128 visible ASCII characters, else a new one."""
    for name in names:
        value = request.headers.get(name)
        if value and len(value) <= 128 and value.isascii() and value.isprintable() and " " not in value:
            return value
    return new_id()


def route(handler: Handler) -> Handler:
    """handler with the request id set first and any error answered as an envelope."""

    async def gateway(request: web.Request) -> web.StreamResponse:
        rid = request[REQUEST_ID] = request_id(request, request.app[SETTINGS].proxy.request_id_headers)
        started = time.monotonic()
        try:
            response = await handler(request)
        except asyncio.CancelledError:  # the caller left (handler_cancellation): aiohttp logs nothing
            access_log.cancelled(request, time.monotonic() - started)
            raise
        except errors.GatewayError as exc:
            response = envelope(exc)
        except web.HTTPException as exc:
            response = envelope(errors.GatewayError(exc.status, "invalid_request_error", "http_error", exc.reason))
        except Exception:
            log.exception("request %s: unhandled error", rid)
            response = envelope(errors.internal_error())
        if not response.prepared:  # a streamed answer was stamped before it started
            stamp(request, response)
        return response

    return gateway


def unrouted(methods: dict[str, tuple[str, ...]]) -> Handler:
    """The catch-all route: 405 (with Allow) on a path served with other methods, else 404.
    ``methods`` is keyed by route path; a path ending in a ``{name:.+}`` part matches any path
    it prefixes."""
    prefixes = [(path.partition("{")[0], allowed) for path, allowed in methods.items() if path.endswith(":.+}")]

    async def handler(request: web.Request) -> web.StreamResponse:
        path = request.path
        allowed = methods.get(path) or next((a for p, a in prefixes if path.startswith(p) and path != p), None)
        if allowed is None:
            raise errors.not_found()
        raise errors.method_not_allowed(", ".join(allowed))

    return route(handler)


def preflight(allow: tuple[str, ...], cors: Cors) -> Handler:
    """A browser's preflight (OPTIONS with Origin and Access-Control-Request-Method) of a route
    serving the methods ``allow``: answered without auth, 204 with the grant for an allowed
    origin, 403 for another; any other OPTIONS is the 405 it was before CORS."""
    methods = ", ".join(allow)

    async def handler(request: web.Request) -> web.StreamResponse:
        headers = request.headers
        origin = headers.get(hdrs.ORIGIN)
        if origin is None or hdrs.ACCESS_CONTROL_REQUEST_METHOD not in headers:
            raise errors.method_not_allowed(methods)
        if not cors.allows(origin):
            raise errors.origin_not_allowed()
        requested = headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS)
        return web.Response(status=204, headers=cors.preflight(methods, requested))

    return route(handler)


def envelope(exc: errors.GatewayError) -> web.Response:
    return web.Response(status=exc.status, body=exc.body(), content_type="application/json", headers=exc.headers)


def framed_unsurely(request: web.Request) -> bool:
    """Whether a peer in front may have framed the request's body otherwise than aiohttp did: a
    Transfer-Encoding in HTTP/1.0, which has none, or one whose last coding is not chunked (an
    empty one beside a Content-Length, which aiohttp then frames by)."""
    if request.version < HttpVersion11:
        return True
    named = [c for c in (c.strip(" \t").lower() for c in ",".join(
        request.headers.getall(hdrs.TRANSFER_ENCODING, ())).split(",")) if c]
    return not named or named[-1] != "chunked"


def stamp(request: web.Request, response: web.StreamResponse) -> None:
    """The headers every answer of ours carries; call before the response is prepared."""
    headers = response.headers
    headers["Server"] = "aisix"  # not aiohttp's, which names Python's and its own version
    rid = request.get(REQUEST_ID)
    if rid is not None:
        headers["x-aisix-request-id"] = rid
        headers["x-request-id"] = rid  # the header the official SDKs read (the upstream's is relayed renamed)
    cors = request.app[SETTINGS].proxy.cors
    if cors is not None:  # errors too: a page can read a 401's or a 429's envelope and headers
        headers.update(cors.grant(request.headers.get(hdrs.ORIGIN)))
    # Draining: callers reconnect to a process that stays. A caller that sent Expect and is
    # answered before its body was read may not have sent it (inbound.py): the connection ends
    # rather than leaving both sides to guess where the next request starts (RFC 9110, 10.1.1).
    # A request whose body a peer in front may have framed otherwise than aiohttp did
    # (framed_unsurely) ends its connection with it (RFC 9112, 6.1 and 6.3).
    if request.app[LIVE].draining or (hdrs.EXPECT in request.headers and not request.content.is_eof()) or \
            (hdrs.TRANSFER_ENCODING in request.headers and framed_unsurely(request)):
        response.force_close()
        headers["Connection"] = "close"


def abort(request: web.Request) -> None:
    """Cut the caller's connection so a started answer cannot look complete."""
    transport = request.transport
    if transport is not None:
        transport.abort()
