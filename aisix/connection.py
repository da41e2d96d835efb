"""aiohttp's connection handler with the answers it makes itself as our envelopes: a request its
HTTP parser refused (a malformed request line or header, a header line over 8190 bytes, more than
128 headers, ambiguous framing) gets a 400 ``invalid_http_request`` envelope and a request id.

Such a request never reaches a route, so the route wrapper (responses.py) cannot answer it:
aiohttp answers it from ``RequestHandler.handle_error``, in plain text. ``AppRunner`` is
aiohttp's with that one method overridden on every connection; aiohttp offers no hook for it, so
this subclasses its server and connection classes, and tests/test_connection.py checks that the
aiohttp installed still has what this relies on. What it cannot do is in docs/api.md, "Errors".
"""

from __future__ import annotations

from aiohttp import web

from . import errors
from .keys import REQUEST_ID
from .responses import envelope, new_request_id


class RequestHandler(web.RequestHandler):
    """One connection; aiohttp's, but for the answer to a request it could not parse."""

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
        rid = request[REQUEST_ID] = new_request_id()
        response.headers.update({"Server": "aisix", "x-aisix-request-id": rid, "x-request-id": rid})
        response.force_close()  # where the next request starts on this connection is unknown
        return response


class Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        return RequestHandler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """aiohttp's AppRunner, serving connections with the RequestHandler above."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app's startup, and the server's settings
        return Server(plain.request_handler, request_factory=plain.request_factory,
                      handler_cancellation=plain.handler_cancellation, loop=plain._loop, **plain._kwargs)
