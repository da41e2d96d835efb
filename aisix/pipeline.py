"""The one request pipeline of the audio routes: every stage, in order, in one function.

declared length (413) -> authenticate (401) -> codings (415, 501) -> read the body up to the
alias (speech: the small JSON; forms: up to the ``model`` part) -> resolve the alias and check
access (404/403/400) -> input guardrails (422) -> admit (429) -> send upstream, failing over
between the alias's targets (failover.py) -> relay the answer
(output guardrails, usage) -> ``finally``: release the body, settle the limiter slot, emit exactly
one usage event. What differs per route is only how its body is read (speech.py, forms.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from aiohttp import HttpVersion11, hdrs, web

from . import aliases, auth, errors, guardrails, pricing, usage
from .audio import Probe, known_seconds
from .config import Model, Resources, Settings, Target
from .deadline import CLIENT, UPSTREAM, Deadline
from .exchange import Exchange
from .failover import Attempts, Replayable
from .inbound import Inbound
from .keys import CLOCK, EXCHANGE, LIMITER, LIVE, METRICS, REQUEST_ID, SETTINGS, USAGE
from .limits import Limiter, Slot
from .relay import relay
from .responses import abort, framed_unsurely

log = logging.getLogger(__name__)


class RequestBody(Replayable, Protocol):
    """A body read up to its alias, by the route's reader; what failover needs of it (the body
    for a target, keeping it to send again) is failover.Replayable."""

    @property
    def alias(self) -> str: ...

    @property
    def texts(self) -> Sequence[str]:
        """Text fields met before the alias, to screen once it is known."""
        ...

    @property
    def characters(self) -> int | None:
        """Speech: the characters of its ``input``."""
        ...

    @property
    def audio(self) -> Probe | None:
        """Uploads: the probe the file part's bytes are fed to."""
        ...

    @property
    def answer_format(self) -> str | None:
        """Speech: the audio format asked for (``response_format``), as an answer of events carries
        it; None for forms."""
        ...

    check_audio: Callable[[float], None] | None

    def audio_seconds(self) -> float | None: ...

    def close(self) -> None: ...


Reader = Callable[[web.Request, Inbound, Settings, Resources], Awaitable[RequestBody]]


async def exchange(request: web.Request, route: str, read: Reader) -> web.StreamResponse:
    app = request.app
    settings, live, clock, limiter = app[SETTINGS], app[LIVE], app[CLOCK], app[LIMITER]
    resources = live.resources  # this request's snapshot, whatever a reload does meanwhile
    idle = settings.upstream.stream_idle_timeout_ms / 1000
    ex = request[EXCHANGE] = Exchange(route, request[REQUEST_ID], clock(), time.monotonic())
    slot = body = deadline = attempts = model = None
    live.enter()
    app[METRICS].started(route)
    try:
        loop = request.task.get_loop()  # not asyncio.get_running_loop(): a getpid() each
        task = asyncio.current_task(loop)
        assert task is not None  # a handler runs in a task of its own
        deadline = Deadline(loop, task)
        with deadline.scope():
            _check_declared_length(request, settings.proxy.request_body_limit_bytes)
            key = auth.lookup(request.headers.get(hdrs.AUTHORIZATION), resources.keys_by_hash)
            ex.api_key = key.name
            auth.check_active(key, clock())
            _check_codings(request)
            inbound = Inbound(request, settings.proxy.request_body_limit_bytes, deadline, idle, ex)
            body = await read(request, inbound, settings, resources)
            ex.model, ex.input_characters = aliases.recorded(body.alias, resources.models), body.characters
            model = aliases.resolve(body.alias, key, resources.models, route)
            if len(model.targets) == 1:  # known before any attempt (with several: once one starts)
                only = model.targets[0]
                ex.upstream_model, ex.provider_key = only.model_name, only.provider_key.name
            inputs = guardrails.rules_for(resources, model.alias, guardrails.INPUT)

            def screen(text: str) -> None:
                ex.verdict = guardrails.enforce(inputs, text) or ex.verdict

            for text in body.texts:
                screen(text)
            slot = await limiter.admit(key, model, clock())
            attempts = Attempts(app, ex, model)
            if body.audio is not None:
                body.check_audio = _audio_check(model, limiter, slot, attempts, clock, body.audio)
                if body.check_audio is not None:  # what a file-first form told already: before any upstream
                    body.check_audio(known_seconds(body.audio))
                if model.provider_audio_quotas:  # a target whose provider key cannot take it is passed over
                    probe = body.audio
                    attempts.known = lambda: known_seconds(probe)

            def sent(target: Target) -> None:
                """The last request byte is on its way: the upstream has its timeout to answer."""
                deadline.wait((model.timeout_ms or settings.upstream.timeout_ms) / 1000, UPSTREAM)
                ex.upstream_sent = time.monotonic()

            answer = await attempts.send(request, route, body, screen, sent, deadline)
            outputs = guardrails.rules_for(resources, model.alias, guardrails.OUTPUT)
            return await relay(request, answer, ex, deadline, idle, outputs, body.answer_format)
    except asyncio.CancelledError:  # the caller left while we waited (handler_cancellation)
        # Unless the drain's deadline cut it: the runner's cleanup cancels what is left before it
        # closes the connections (connection.RequestHandler.peer_gone).
        if live.cutting and not getattr(request.protocol, "peer_gone", False):
            ex.status = ex.response.status if ex.response is not None else 503
            ex.error_code = "shutting_down"
        else:
            ex.status, ex.error_code = 499, "client_closed"
        raise
    except BaseException as exc:
        return _failed(request, ex, exc, deadline is None or deadline.waiting_on == CLIENT)
    finally:
        if deadline is not None:
            deadline.close()  # before any await: its timer must not fire into a finished exchange
        if body is not None:
            ex.audio_seconds_in = _to_ms(body.audio_seconds())
            body.close()
        # Priced, charged and counted as the usage event shows them (to the millisecond), so that
        # a cost is the price times the event's figure and the metrics add up to the events.
        ex.audio_seconds_out = _to_ms(ex.audio_seconds_out)
        tokens = ex.usage.tokens if ex.usage else None
        if model is not None and ex.billable:
            ex.cost_usd = _cost(ex, model, attempts.answered if attempts is not None else None)
        audio = None  # charged to audio quotas only when the upstream did the work
        if ex.billable:
            audio = _audio_in(ex) if route != "speech" else ex.audio_seconds_out
        try:  # the provider key's slot (of the answering attempt), then the key's and model's
            await limiter.settle_all((attempts.slot if attempts is not None else None, slot), tokens, clock(),
                                     ex.cost_usd, audio)
        finally:  # the usage event and the drain's count, even if the caller's leaving cancels that
            _finish(app, ex, resources)


def _audio_check(model: Model, limiter: Limiter, slot: Slot | None, attempts: Attempts,
                 clock: Callable[[], float], probe: Probe) -> Callable[[float], None] | None:
    """What an upload's audio length is held to (max_audio_seconds, what the audio quotas of its
    key, its model and the provider key of the attempt under way have left), as a check the form
    calls as soon as it knows a length; None when nothing limits it."""
    limit = model.max_audio_seconds
    if not limit and (slot is None or slot.audio_left is None) and not model.provider_audio_quotas:
        return None

    def check(seconds: float) -> None:
        if limit and seconds > limit:
            raise errors.audio_too_long(seconds, limit, at_least=probe.declared is None)
        now = clock()
        for held in (slot, attempts.slot):
            refusal = limiter.audio_refusal(held, seconds, now, at_least=probe.declared is None)
            if refusal is not None:
                raise refusal

    return check


def _to_ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _audio_in(ex: Exchange) -> float | None:
    """The upload's seconds: the upstream's own figure when it reported one, else measured."""
    reported = ex.usage.audio_seconds if ex.usage is not None else None
    return reported if reported is not None else ex.audio_seconds_in


def _cost(ex: Exchange, model: Model, target: Target | None) -> float | None:
    prices = pricing.prices_of(model, target)
    if prices is None:
        return None
    u = ex.usage
    return pricing.cost(prices, pricing.Quantities(
        ex.input_characters, _audio_in(ex), ex.audio_seconds_out,
        u.input_tokens if u is not None else None, u.output_tokens if u is not None else None))


def _failed(request: web.Request, ex: Exchange, exc: BaseException, on_client: bool) -> web.StreamResponse:
    """Record how the request ended (errors.outcome, the one mapping) and answer with its
    envelope, or cut off a caller that left or already has the status line of an answer."""
    end = errors.outcome(exc, on_client, ex.response is not None)
    if ex.response is None:
        ex.status = end.status
    ex.error_code = end.code
    if isinstance(exc, errors.GuardrailBlocked):
        ex.verdict = guardrails.Verdict(exc.guardrail, guardrails.BLOCKED)
    elif isinstance(exc, errors.RateLimited):
        request.app[METRICS].limited(exc.scope)
    elif not isinstance(exc, TimeoutError | ConnectionError | errors.GatewayError):
        log.error("request %s: unhandled error", ex.request_id, exc_info=exc)
    if end.reply is not None:
        ex.bytes_out = len(end.reply.body())  # the envelope is what the caller gets
        try:
            raise end.reply from None
        finally:  # this frame's locals must not hold what its traceback holds this frame in
            del end, exc
    abort(request)  # a short answer must never look complete
    return ex.response or web.Response(status=499)  # nobody reads the latter: the caller left


def _finish(app: web.Application, ex: Exchange, resources: Resources) -> None:
    """Every exchange ends here exactly once."""
    ex.latency_ms = int((time.monotonic() - ex.started) * 1000)
    app[USAGE].emit(usage.event(ex))
    app[METRICS].finished(ex, ex.model in resources.models)
    app[LIVE].leave()


def _check_declared_length(request: web.Request, limit: int) -> None:
    if limit and request.content_length is not None and request.content_length > limit:
        raise errors.request_too_large(limit)


def _check_codings(request: web.Request) -> None:
    """Bodies are read as sent (the server does not decode them): a coded body is refused, since
    the gateway could not forward it with a length it can vouch for (docs/design.md)."""
    # aiohttp frames a body by a final "chunked" whatever comes before it ("gzip, chunked"): a
    # transfer coding it did not undo would be forwarded as if it were the body (RFC 9112: 501).
    for header, plain, refusal in _CODINGS:
        for coding in request.headers.getall(header, ()):
            if any(c.strip(" \t").lower() not in (plain, "") for c in coding.split(",")):
                raise refusal()
    # A Transfer-Encoding naming no coding at all: aiohttp frames the body by its Content-Length,
    # a peer in front may by chunked (RFC 9112, 6.3: 400, and the connection closed, by stamp).
    if hdrs.TRANSFER_ENCODING in request.headers and request.version >= HttpVersion11 and framed_unsurely(request):
        raise errors.invalid_http_request()


_CODINGS = ((hdrs.CONTENT_ENCODING, "identity", errors.unsupported_content_encoding),
            (hdrs.TRANSFER_ENCODING, "chunked", errors.unsupported_transfer_encoding))


def route(name: str, read: Reader) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler of one audio route: the pipeline, with the route's reader (a partial, not a
    coroutine around it: one frame less on every resumption of the request's task)."""
    return functools.partial(exchange, route=name, read=read)

