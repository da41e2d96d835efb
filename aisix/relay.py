"""An upstream answer to the caller, chunk by chunk as it arrives, with the headers SPEC 5 names.

Memory per request is one chunk. A failure after the caller has the status line aborts the
caller's connection: a chunked answer is never terminated and a Content-Length answer never
completed, so no client can take a cut-short answer for a complete one.
"""

from __future__ import annotations

import time

import aiohttp
from aiohttp import web

from .deadline import CLIENT, UPSTREAM, Deadline
from .exchange import Exchange

_RELAYED = ("Content-Type", "Content-Length", "Content-Disposition", "Retry-After")
_STREAMED = ("audio/", "text/event-stream")


async def relay(
    request: web.Request, upstream: aiohttp.ClientResponse, ex: Exchange, deadline: Deadline, idle: float
) -> web.StreamResponse:
    if ex.upstream_sent is not None:
        ex.upstream_ttfb_ms = int((time.monotonic() - ex.upstream_sent) * 1000)
    up = upstream.headers
    headers = {name: up[name] for name in _RELAYED if name in up}
    if "x-request-id" in up:
        headers["x-upstream-request-id"] = up["x-request-id"]
    response = web.StreamResponse(status=upstream.status, headers=headers)
    ex.status = upstream.status
    ex.stream = upstream.status < 300 and up.get("Content-Type", "").startswith(_STREAMED)
    if upstream.status >= 300:
        ex.error_code = "upstream_error"
    content = upstream.content
    try:
        deadline.wait(idle, CLIENT)
        await response.prepare(request)
        ex.response = response
        while True:
            deadline.wait(idle, UPSTREAM)
            chunk = await content.readany()
            if not chunk:
                break
            deadline.wait(idle, CLIENT)
            await response.write(chunk)
            ex.bytes_out += len(chunk)
        await response.write_eof()
    except (aiohttp.ClientError, ConnectionError):
        upstream.close()
        if deadline.waiting_on == CLIENT:
            ex.gone()
        else:
            ex.fail(502, "upstream_aborted")
        abort(request)
    except BaseException:
        upstream.close()
        raise
    else:
        upstream.release()  # read to the end: the connection goes back to the pool
    return response


def abort(request: web.Request) -> None:
    """Cut the caller's connection so a started answer cannot look complete."""
    transport = request.transport
    if transport is not None:
        transport.abort()
