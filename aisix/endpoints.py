"""The routes that are not audio: ``GET /v1/models`` and ``/v1/models/{alias}`` (the caller's
aliases) and the probes."""

from __future__ import annotations

import orjson
from aiohttp import hdrs, web

from . import aliases, auth, errors
from .config import ApiKey, Resources
from .keys import CALLER, CLOCK, LIVE


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: the aliases this caller may use, in OpenAI's list shape."""
    resources, key = _caller(request)
    data = [_model(resources, alias) for alias in key.allowed_sorted]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{alias} (the SDKs' ``models.retrieve``): one alias as the list shows it. An
    alias this key may not use is 404 like one that does not exist: the key cannot list it either,
    and the answer must not tell the caller which aliases exist."""
    resources, key = _caller(request)
    alias = request.match_info["alias"]
    if alias not in key.allowed:
        raise errors.model_not_found(aliases.printable(alias))
    return web.Response(body=orjson.dumps(_model(resources, alias)), content_type="application/json")


def _caller(request: web.Request) -> tuple[Resources, ApiKey]:
    """This request's resources and its key, or the 401 that says why not."""
    resources = request.app[LIVE].resources
    key = auth.lookup(request.headers.get(hdrs.AUTHORIZATION), resources.keys_by_hash)
    request[CALLER] = key.name
    auth.check_active(key, request.app[CLOCK]())
    return resources, key


def _model(resources: Resources, alias: str) -> dict[str, object]:
    return {"id": alias, "object": "model", "created": 0, "owned_by": resources.models[alias].provider_key.provider}


async def livez(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    if request.app[LIVE].draining:  # the load balancer stops sending; what is in flight finishes
        return web.Response(status=503, body=b'{"status":"draining"}', content_type="application/json")
    return web.Response(body=b'{"status":"ready"}', content_type="application/json")
