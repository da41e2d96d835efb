"""The request id and the error envelope: the only middleware, so no route can skip either.

Every response, streamed ones included, gets ``x-aisix-request-id`` in ``on_response_prepare``.
"""

from __future__ import annotations

import logging
import uuid

from aiohttp import web

from . import errors
from .keys import LIVE, REQUEST_ID, SETTINGS

log = logging.getLogger(__name__)

_HTTP_ERRORS = {404: errors.not_found, 405: errors.method_not_allowed}


def request_id(request: web.Request, names: tuple[str, ...]) -> str:
    """The caller's id when it is 1-128 visible ASCII characters, else a new one."""
    for name in names:
        value = request.headers.get(name)
        if value and len(value) <= 128 and value.isascii() and value.isprintable() and " " not in value:
            return value
    return uuid.uuid4().hex


@web.middleware
async def gateway(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    rid = request[REQUEST_ID] = request_id(request, request.app[SETTINGS].proxy.request_id_headers)
    try:
        return await handler(request)
    except errors.GatewayError as exc:
        return envelope(exc)
    except web.HTTPException as exc:
        make = _HTTP_ERRORS.get(exc.status)
        if make is not None:
            return envelope(make())
        return envelope(errors.GatewayError(exc.status, "invalid_request_error", "http_error", exc.reason))
    except Exception:
        log.exception("request %s: unhandled error", rid)
        return envelope(errors.internal_error())


def envelope(exc: errors.GatewayError) -> web.Response:
    return web.Response(status=exc.status, body=exc.body(), content_type="application/json", headers=exc.headers)


async def stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "aisix"  # not aiohttp's, which names Python's and its own version
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers["x-aisix-request-id"] = rid
    if request.app[LIVE].draining:
        # Callers reconnect to a process that stays. The hook runs after aiohttp wrote its
        # Connection header, so both the header and the close are ours to set.
        response.force_close()
        response.headers["Connection"] = "close"
