"""One access-log line per request: request id, route, alias, status, latency and bytes.

Never a key, a prompt or a header value other than the request id. ``--access-log off`` removes
it entirely (load tests).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .keys import EXCHANGE, REQUEST_ID


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        ex = request.get(EXCHANGE)
        self.logger.info(
            '%s "%s %s" %s rid=%s model=%s latency_ms=%d bytes_in=%d bytes_out=%d',
            request.remote, request.method, request.path,
            ex.status if ex is not None and ex.status else response.status,
            request.get(REQUEST_ID, "-"), (ex.model if ex is not None else None) or "-",
            time * 1000, ex.bytes_in if ex is not None else 0,
            ex.bytes_out if ex is not None else response.body_length,
        )
