"""One access-log line per request: client, request line, status, request id, caller key name,
alias, latency, body bytes and the upstream attempts (docs/operations.md, "Logs").

Never a key, a prompt, a query string or a header value other than the request id. aiohttp writes
the line once the answer is written; a handler cancelled because its caller left is never handed
back to aiohttp, so ``cancelled`` writes that request's one line instead. The probes (``/livez``,
``/readyz``) get none unless ``access_log.probes`` is set; ``--access-log off`` removes the log
entirely (load tests).
"""

from __future__ import annotations

import json
import logging
import re
from typing import cast

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .keys import CALLER, EXCHANGE, REQUEST_ID

PROBES = frozenset(("/livez", "/readyz"))
_BARE = re.compile(r"[!#-~]+")  # printable ASCII but space and '"': written as is, else quoted
_LEFT = web.Response(status=499)  # the answer of a caller that left before it had one; never sent


class AccessLogger(AbstractAccessLogger):
    probes = False  # whether /livez and /readyz are logged; configured() sets it

    @classmethod
    def configured(cls, probes: bool) -> type[AccessLogger]:
        """The class aiohttp is given (it makes one instance per connection)."""
        return cast(type[AccessLogger], type(cls.__name__, (cls,), {"probes": probes}))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = request.rel_url.raw_path  # as sent: a decoded %0A would start a line of its own
        if not self.probes and path in PROBES:
            return
        ex = request.get(EXCHANGE)
        attempts = None
        if ex is not None:
            status, key, model, bytes_in, bytes_out = (
                ex.status or response.status, ex.api_key, ex.model, ex.bytes_in, ex.bytes_out)
            if ex.attempts:  # provider key and status (or how it failed) of each, in order
                attempts = ",".join(f"{a['provider_key']}:{a['status'] or a['error'] or 'aborted'}"
                                    for a in ex.attempts)
        else:
            status, key, model, bytes_in = response.status, request.get(CALLER), None, 0
            # Body bytes, as on the audio routes: aiohttp's body_length counts the headers too.
            bytes_out = 0 if request.method == "HEAD" else response.content_length or 0
        self.logger.info(
            '%s "%s %s" %s rid=%s key=%s model=%s latency_ms=%d bytes_in=%d bytes_out=%d attempts=%s',
            request.remote, request.method, path, status, _field(request.get(REQUEST_ID)), _field(key),
            _field(model), time * 1000, bytes_in, bytes_out, _field(attempts),
        )


def cancelled(request: web.BaseRequest, elapsed: float) -> None:
    """The line of a request whose handler was cancelled (its caller left): aiohttp writes none."""
    logger = request.protocol.access_logger
    if logger is None or not logger.enabled:  # --access-log off
        return
    ex = request.get(EXCHANGE)
    if ex is not None:
        logger.log(request, ex.response or _LEFT, ex.latency_ms / 1000)  # as in its usage event
    else:
        logger.log(request, _LEFT, elapsed)


def _field(value: str | None) -> str:
    """A value for key=value: "-" when absent, JSON-quoted unless it is one plain word. The alias
    is the caller's own string; unquoted, a newline in it would forge a log line."""
    if not value:
        return "-"
    return value if _BARE.fullmatch(value) else json.dumps(value)
