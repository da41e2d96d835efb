"""The routes that are not audio: ``GET /v1/models`` (the caller's aliases) and the probes."""

from __future__ import annotations

import orjson
from aiohttp import hdrs, web

from . import auth
from .keys import CALLER, CLOCK, LIVE


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: the aliases this caller may use, in OpenAI's list shape."""
    resources = request.app[LIVE].resources
    key = auth.lookup(request.headers.get(hdrs.AUTHORIZATION), resources.keys_by_hash)
    request[CALLER] = key.name
    auth.check_active(key, request.app[CLOCK]())
    data = [
        {"id": alias, "object": "model", "created": 0, "owned_by": resources.models[alias].provider_key.provider}
        for alias in key.allowed_sorted
    ]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


async def livez(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    if request.app[LIVE].draining:  # the load balancer stops sending; what is in flight finishes
        return web.Response(status=503, body=b'{"status":"draining"}', content_type="application/json")
    return web.Response(body=b'{"status":"ready"}', content_type="application/json")
