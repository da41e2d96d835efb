"""The audio routes. ``_exchange`` is the pipeline every route runs, in order, in one place.

Speech reads its small JSON body whole (capped); transcriptions and translations stream the
multipart body through the rewriter and never hold the file in memory.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from . import aliases, auth, errors, guardrails, multipart, upstream
from .config import ApiKey, Model, Resources, Settings
from .deadline import CLIENT, UPSTREAM, Deadline
from .exchange import Exchange
from .keys import EXCHANGE, LIMITER, LIVE, METRICS, REQUEST_ID, SETTINGS, UPSTREAM, USAGE
from .limits import RateLimited
from .relay import abort, relay
from .spool import Spool


@dataclass(slots=True)
class Outbound:
    """What goes upstream: to which model, with which body."""

    model: Model
    body: bytes | upstream.Body
    content_type: str
    content_length: int | None  # None: a bytes body is sized by the client, a stream goes chunked
    held: Spool | None = None   # closed by the pipeline whatever happens, even if never sent


class Inbound:
    """The caller's body as it arrives: counted, capped at the body limit, timed."""

    __slots__ = ("_content", "_limit", "_deadline", "_idle", "_ex")

    def __init__(self, request: web.Request, limit: int, deadline: Deadline, idle: float, ex: Exchange) -> None:
        self._content = request.content
        self._limit = limit
        self._deadline = deadline
        self._idle = idle
        self._ex = ex

    async def read(self) -> bytes:
        """The next chunk; b"" at the end of the body."""
        self._deadline.wait(self._idle, CLIENT)
        try:
            while True:
                # One chunk as aiohttp's parser gave it (readany would join all that are
                # buffered: a copy of up to the whole body). (b"", True) marks the end of an
                # HTTP chunk, not of the body.
                chunk, chunk_end = await self._content.readchunk()
                if chunk or not chunk_end:
                    break
        except ConnectionError:
            raise errors.client_closed() from None
        except HttpProcessingError:
            raise errors.invalid_request("invalid_body", "The request body is malformed.") from None
        self._deadline.waiting_on = UPSTREAM
        self._ex.bytes_in += len(chunk)
        if self._limit and self._ex.bytes_in > self._limit:
            raise errors.request_too_large(self._limit)
        return chunk

    async def read_all(self, limit: int) -> bytes:
        data = bytearray()
        while chunk := await self.read():
            data += chunk
            if len(data) > limit:
                raise errors.request_too_large(limit)
        return bytes(data)


BodyReader = Callable[[web.Request, Inbound, ApiKey, Resources, Settings, Deadline, Exchange], Awaitable[Outbound]]


async def _exchange(request: web.Request, route: str, read_body: BodyReader) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    live = app[LIVE]
    resources = live.resources  # this request's snapshot, whatever a reload does meanwhile
    idle = settings.upstream.stream_idle_timeout_ms / 1000
    ex = request[EXCHANGE] = Exchange(route, request[REQUEST_ID])
    limiter = app[LIMITER]
    slot = out = deadline = None
    live.enter()
    app[METRICS].started(route)
    try:
        async with asyncio.timeout(None) as timer:
            deadline = Deadline(timer)
            _check_declared_length(request, settings.proxy.request_body_limit_bytes)
            key = auth.lookup(request.headers.get(hdrs.AUTHORIZATION), resources.keys_by_hash)
            ex.api_key = key.name
            auth.check_active(key, time.time())
            _check_content_encoding(request)
            inbound = Inbound(request, settings.proxy.request_body_limit_bytes, deadline, idle, ex)
            out = await read_body(request, inbound, key, resources, settings, deadline, ex)
            model = out.model
            ex.upstream_model = model.model_name
            ex.provider_key = model.provider_key.name
            slot = await limiter.admit(key, model, time.time())
            if isinstance(out.body, bytes):
                _sent(ex, deadline, model, settings)
            answer = await app[UPSTREAM].send(
                model.urls[route], model.provider_key.authorization, ex.request_id, out.content_type,
                request.headers.get(hdrs.ACCEPT), out.body, out.content_length,
            )
            outputs = guardrails.rules_for(resources, model.alias, guardrails.OUTPUT)
            return await relay(request, answer, ex, deadline, idle, outputs)
    except TimeoutError:
        if deadline.waiting_on == CLIENT:
            ex.fail(408, "client_timeout")
            if ex.response is None:
                raise _answered(ex, errors.client_timeout()) from None
        else:
            ex.fail(504, "upstream_aborted" if ex.response is not None else "upstream_timeout")
            if ex.response is None:
                raise _answered(ex, errors.upstream_timeout()) from None
        abort(request)
        return ex.response
    except asyncio.CancelledError:
        ex.gone()
        raise
    except errors.GatewayError as exc:
        ex.fail(exc.status, exc.code)
        if ex.response is None:
            ex.bytes_out = len(exc.body())  # the envelope is what the caller gets
        if isinstance(exc, RateLimited):
            app[METRICS].limited(exc.scope)
        raise
    except BaseException:
        ex.fail(500, "internal_error")
        if ex.response is not None:
            abort(request)  # a bug mid-answer: the caller must not wait on, or trust, what it got
        raise
    finally:
        if deadline is not None:
            deadline.close()  # before any await: its timer must not fire into a finished exchange
        if out is not None and out.held is not None:
            out.held.close()
        await limiter.settle(slot, ex.usage.tokens if ex.usage else None, time.time())
        _finish(app, ex, resources)


def _answered(ex: Exchange, exc: errors.GatewayError) -> errors.GatewayError:
    ex.bytes_out = len(exc.body())
    return exc


def _finish(app: web.Application, ex: Exchange, resources: Resources) -> None:
    """Every exchange ends here exactly once."""
    app[USAGE].emit(ex.event())
    app[METRICS].finished(ex, ex.model in resources.models)
    app[LIVE].leave()


def _sent(ex: Exchange, deadline: Deadline, model: Model, settings: Settings) -> None:
    """The last request byte is on its way: from now the upstream has its timeout to answer."""
    timeout_ms = model.timeout_ms or settings.upstream.timeout_ms
    deadline.wait(timeout_ms / 1000, UPSTREAM)
    ex.upstream_sent = time.monotonic()


def _check_content_encoding(request: web.Request) -> None:
    """Bodies are read as sent (the server does not decode them): a coded body is refused, since
    the gateway could not forward it with a length it can vouch for (docs/design.md)."""
    for coding in request.headers.getall(hdrs.CONTENT_ENCODING, ()):
        if any(c.strip(" \t").lower() not in ("identity", "") for c in coding.split(",")):
            raise errors.unsupported_content_encoding()


def _check_declared_length(request: web.Request, limit: int) -> None:
    if limit and request.content_length is not None and request.content_length > limit:
        raise errors.request_too_large(limit)


async def speech(request: web.Request) -> web.StreamResponse:
    return await _exchange(request, "speech", _speech_body)


async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await _exchange(request, "transcriptions", _form_body)


async def translations(request: web.Request) -> web.StreamResponse:
    return await _exchange(request, "translations", _form_body)


async def _speech_body(
    request: web.Request, inbound: Inbound, key: ApiKey, resources: Resources,
    settings: Settings, deadline: Deadline, ex: Exchange,
) -> Outbound:
    if request.content_type != "application/json":
        raise errors.unsupported_content_type("application/json")
    raw = await inbound.read_all(settings.proxy.json_body_limit_bytes)
    try:
        doc = orjson.loads(raw)
        exact = _LONG_NUMBER.search(raw) is not None
        if exact:  # orjson reads an integer past 64 bits as a float; the stdlib keeps it exact
            doc = json.loads(raw)
    except (orjson.JSONDecodeError, RecursionError):
        raise errors.invalid_json("The request body is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise errors.invalid_json("The request body must be a JSON object.")
    alias = doc.get("model")
    if not isinstance(alias, str) or not alias:
        raise errors.missing_model()
    ex.model = alias
    model = aliases.resolve(alias, key, resources.models)
    text = doc.get("input")
    if isinstance(text, str):
        ex.screen(guardrails.rules_for(resources, alias, guardrails.INPUT), text)
    # Re-serialised rather than spliced: the upstream gets exactly the document we checked, with
    # every other key in its order and with its value.
    doc["model"] = model.model_name
    body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() if exact else orjson.dumps(doc)
    return Outbound(model, body, "application/json", None)


_LONG_NUMBER = re.compile(rb"\d{19,}")


async def _form_body(
    request: web.Request, inbound: Inbound, key: ApiKey, resources: Resources,
    settings: Settings, deadline: Deadline, ex: Exchange,
) -> Outbound:
    boundary = multipart.boundary_of(request.headers.get(hdrs.CONTENT_TYPE, ""))
    content_type = multipart.content_type_for(boundary)
    # Prompts are read only when some input guardrail could look at them.
    rw = multipart.Rewriter(boundary, _PROMPT if resources.scans_prompts else _MODEL_ONLY)
    held = Spool()  # what comes before the model value (the whole file, when it comes first)
    prompts: list[str] = []  # prompts met before the alias, checked once it is known
    try:
        while True:
            chunk = await inbound.read()
            pieces = rw.feed(chunk) if chunk else rw.close()
            for i, piece in enumerate(pieces):
                if not isinstance(piece, multipart.Field):
                    held.write(piece)
                elif piece.name != multipart.MODEL:
                    prompts.append(_text(piece))
                    held.write(piece.value)
                else:
                    alias = _text(piece)
                    ex.model = alias
                    model = aliases.resolve(alias, key, resources.models)
                    rules = guardrails.rules_for(resources, alias, guardrails.INPUT)
                    for prompt in prompts:
                        ex.screen(rules, prompt)
                    after = [model.model_name_bytes, *pieces[i + 1:]]
                    length = request.content_length
                    if length is not None:
                        length += len(model.model_name_bytes) - len(piece.value)
                    form = _Upload(held, rw, inbound, deadline, ex, rules)
                    body = form.stream(after, model, settings)
                    return Outbound(model, body, content_type, length, held)
            if not chunk:
                raise errors.missing_model()
    except BaseException:
        held.close()
        raise


_MODEL_ONLY = frozenset({multipart.MODEL})
_PROMPT = frozenset({multipart.MODEL, "prompt"})


class _Upload:
    """The rewritten body on its way: what was held, the new model value, then the rest as it
    arrives. A prompt after the file is checked before the closing delimiter can go out, so a
    blocked request never reaches the upstream complete."""

    __slots__ = ("_held", "_rw", "_inbound", "_deadline", "_ex", "_rules")

    def __init__(self, held: Spool, rw: multipart.Rewriter, inbound: Inbound, deadline: Deadline,
                 ex: Exchange, rules: tuple) -> None:
        self._held, self._rw, self._inbound = held, rw, inbound
        self._deadline, self._ex, self._rules = deadline, ex, rules

    async def stream(self, after: list[multipart.Piece], model: Model,
                     settings: Settings) -> AsyncIterator[list[bytes | bytearray | memoryview]]:
        """The body as writes: each a list of pieces the client sends with one writev."""
        rw, inbound = self._rw, self._inbound
        try:
            write: list[bytes | bytearray | memoryview] = []
            for chunk in self._held.chunks():  # one in memory; 256 KiB reads from a temp file
                if write:
                    yield write
                write = [chunk]
            write += self._outgoing(after)
            after.clear()  # it holds the first chunk after the model: not for the whole upload
            yield write
            while True:
                chunk = await inbound.read()
                pieces = rw.feed(chunk) if chunk else rw.close()
                if pieces:
                    yield self._outgoing(pieces)
                if not chunk:
                    break
            _sent(self._ex, self._deadline, model, settings)
        finally:
            self._held.close()

    def _outgoing(self, pieces: list[multipart.Piece]) -> list[bytes | bytearray | memoryview]:
        """The pieces as one write: small ones joined (fewer iovecs), large ones as they are (no
        copy of file bytes), and any prompt among them checked before the write can go out."""
        out: list[bytes | bytearray | memoryview] = []
        small = bytearray()
        for piece in pieces:
            if isinstance(piece, multipart.Field):
                self._ex.screen(self._rules, _text(piece))
                piece = piece.value
            if len(piece) >= _SMALL:
                if small:
                    out.append(small)
                    small = bytearray()
                out.append(piece)
            else:
                small += piece
        if small:
            out.append(small)
        return out


_SMALL = 16 * 1024  # below this, pieces are joined into one write


def _text(field: multipart.Field) -> str:
    try:
        value = field.value.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.invalid_multipart(f"The '{field.name}' field is not valid UTF-8.") from None
    if not value and field.name == multipart.MODEL:
        raise errors.missing_model()
    return value


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: the aliases this caller may use, in OpenAI's list shape."""
    resources = request.app[LIVE].resources
    key = auth.lookup(request.headers.get(hdrs.AUTHORIZATION), resources.keys_by_hash)
    auth.check_active(key, time.time())
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

