"""aiohttp's connection handler with the answers it makes itself as our envelopes: a request its
HTTP parser refused (a malformed request line or header, a header line over 8190 bytes, more than
128 headers, ambiguous framing) gets a 400 ``invalid_http_request`` envelope and a request id.

And one repair: aiohttp's C parser, meeting broken framing in a body under way (a chunk size
that is not hex, a chunk that does not end where it said), forgets that body without telling it,
so the handler reading it would wait out its idle timeout; here the body is given the parser's
error, and its reader answers 400 ``invalid_body`` at once, as with aiohttp's Python parser.

Such a request never reaches a route, so the route wrapper (responses.py) cannot answer it:
aiohttp answers it from ``RequestHandler.handle_error``, in plain text. ``AppRunner`` is
aiohttp's with that one method overridden on every connection; aiohttp offers no hook for it, so
this subclasses its server and connection classes, and tests/test_connection.py checks that the
aiohttp installed still has what this relies on. What it cannot do is in docs/api.md, "Errors".
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import errors
from .cors import Cors
from .exchange import new_id
from .keys import REQUEST_ID, SETTINGS
from .responses import envelope


class _BodyErrors:
    """aiohttp's request parser, which also gives the body under way the error it raises."""

    __slots__ = ("_body", "_parser")

    def __init__(self, parser: Any) -> None:
        self._parser = parser
        self._body: Any = None  # the StreamReader of the last request parsed on this connection

    def feed_data(self, data: bytes) -> Any:
        try:
            result = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            body, self._body = self._body, None
            if body is not None and not body.is_eof():
                body.set_exception(exc)
            raise
        if result[0]:
            self._body = result[0][-1][1]
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


class RequestHandler(web.RequestHandler):
    """One connection; aiohttp's, but for the answer to a request it could not parse, and
    ``peer_gone``: whether the caller's end of it went first. A handler cancelled then was
    cancelled because its caller left; one cancelled while it is False, by the server's stop
    (aiohttp cancels a handler before it closes the connection, and a connection lost before it
    cancels)."""

    peer_gone = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parser = _BodyErrors(self._parser)  # type: ignore[assignment]  # feed_data is all it is asked for

    def connection_lost(self, exc: BaseException | None) -> None:
        self.peer_gone = True
        super().connection_lost(exc)

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's logs the error (logs.py keeps the kind, drops the bytes) and raises when an
        # answer had started on this connection: nothing else can be sent on it then.
        super().handle_error(request, status, exc, message)
        error = errors.invalid_http_request() if status == 400 else errors.internal_error()
        response = envelope(error)
        # The caller's headers were not parsed, so its own request id cannot be kept: a new one,
        # in the access-log line too.
        rid = request[REQUEST_ID] = new_id()
        response.headers.update({"Server": "aisix", "x-aisix-request-id": rid, "x-request-id": rid})
        # The grant every answer carries, when it is the same for every origin (["*"]): a page
        # reads this envelope too. A list of origins cannot be granted: the Origin was not read.
        cors = getattr(self._manager, "cors", None)
        if cors is not None and cors.any_origin:
            response.headers.update(cors.grant(None))
        response.force_close()  # where the next request starts on this connection is unknown
        return response


class Server(web.Server):
    cors: Cors | None = None  # proxy.cors, for the answers made here

    def __call__(self) -> web.RequestHandler:
        return RequestHandler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """aiohttp's AppRunner, serving connections with the RequestHandler above."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app's startup, and the server's settings
        handle = plain.request_handler

        def routed(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
            # `OPTIONS *` and `CONNECT host:443` name no path: no route of aiohttp's router can
            # match them, and it answered its own plain 404. Given a path of their target, they
            # reach the catch-all route's 404 envelope (and the access log) like any unknown path.
            if request.path.startswith("/"):
                return handle(request)
            return handle(request.clone(rel_url="/" + request.raw_path))

        server = Server(routed, request_factory=plain.request_factory,
                        handler_cancellation=plain.handler_cancellation, loop=plain._loop, **plain._kwargs)
        server.cors = self.app[SETTINGS].proxy.cors
        return server
