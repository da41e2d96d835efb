"""The attempts of one request: choose a target (routing.py), send, and fail over to another while
the caller has nothing of the answer yet.

An attempt fails over on a connection failure, no answer head within the timeout, or a status in
``routing.FAILOVER_STATUSES``, when another target is left, ``retry.max_attempts`` allows it and
the body can be sent again (a speech body always; an upload while its copy on disk is under
``retry.replay_limit_bytes``, forms.py). Otherwise the last answer is relayed as it came, or the
last failure is the caller's 502/504. Each attempt holds its provider key's slot (limits.py) until
the next one starts, or, for the one answering, until the request is settled.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Protocol

from aiohttp import hdrs, web
from multidict import CIMultiDictProxy

from . import errors, routing
from .config import Model, Target
from .deadline import UPSTREAM, Deadline
from .exchange import Exchange
from .keys import CLOCK, LIMITER, METRICS, POOL, SETTINGS
from .limits import Slot
from .upstream import Answer, Body, raise_upload_error

log = logging.getLogger(__name__)
_REFUSED_WARN_S = 60.0  # between two warnings that a provider refused one key
_refused_warned: dict[str, float] = {}  # provider key name -> when (monotonic); one per configured key


def warn_refused(provider_key: str) -> None:
    """A provider refused the key it is called with (HTTP 401), whether or not a failover saved the
    request: the operator is told at most every minute per key, by name (never the provider's
    body, which may name the key's last characters). The caller gets upstream_auth_failed."""
    now = time.monotonic()
    if now - _refused_warned.get(provider_key, -_REFUSED_WARN_S) >= _REFUSED_WARN_S:
        _refused_warned[provider_key] = now
        log.warning("the upstream refused provider key %r (HTTP 401): check its api_key", provider_key)


class Replayable(Protocol):
    """A request body as the attempts see it."""

    def outbound(self, target: Target, screen: Callable[[str], None],
                 sent: Callable[[], None]) -> tuple[bytes | Body, int | None]:
        """The body for this target and its length (None: chunked). ``screen`` is called on
        every text field still to come; ``sent`` once the last byte of a streamed body has gone
        (bytes leave with the head in one write, and the pool calls it then: after the connect,
        which has its own timeout). Called again for another target after a failover, while
        ``replayable()``."""
        ...

    def keep(self, limit: int) -> None:
        """From now on keep what is sent (up to ``limit`` bytes) so another outbound() can replay it."""

    def replayable(self) -> bool: ...

    @property
    def content_type(self) -> str:
        """What the upstream is told."""
        ...


class Attempts:
    __slots__ = ("_app", "_ex", "_model", "answered", "known", "slot")

    def __init__(self, app: web.Application, ex: Exchange, model: Model) -> None:
        self._app, self._ex, self._model = app, ex, model
        self.slot: Slot | None = None  # the provider key's slot of the attempt under way
        self.answered: Target | None = None  # whose answer the caller gets
        # An upload's length as far as it is known (0 before it is), when a target's provider key
        # has an audio quota: a key that has less left refuses it, and its target is passed over.
        self.known: Callable[[], float] | None = None

    async def send(self, request: web.Request, route: str, body: Replayable, screen: Callable[[str], None],
                   sent: Callable[[Target], None], deadline: Deadline) -> Answer | Buffered:
        app, ex, model = self._app, self._ex, self._model
        limiter, clock, metrics = app[LIMITER], app[CLOCK], app[METRICS]
        targets = model.targets
        routed = len(targets) > 1  # a choice to make: cooldowns steer it, even with no retry
        keys = model.cooldown_keys
        cooling: dict[int, float] = {}
        if routed:
            if model.retry.max_attempts > 1:
                body.keep(model.retry.replay_limit_bytes)
            cooling = await limiter.cooling(keys, clock())
            metrics.cooling(model.alias, targets, cooling)
        tried: set[int] = set()
        refused: set[int] = set()
        ex.attempts = []
        last: BaseException | None = None  # the last failure without an answer
        kept: tuple[Target, Buffered, int | None] | None = None  # the last failed answer, read whole, its ttfb
        answer: Answer | None = None
        try:
            while True:
                i = None
                if self._more(tried, refused, body):
                    i = routing.choose(model, tried, cooling, refused, random.random)
                if i is None:  # nothing left to try: the last answer as it came, or the last failure
                    if kept is not None:
                        ex.upstream_model, ex.provider_key = kept[0].model_name, kept[0].provider_key.name
                        ex.upstream_ttfb_ms = kept[2]  # that answer's own, not a later attempt's
                        self.answered = kept[0]
                        if kept[1].status == 401:
                            raise errors.upstream_auth_failed()
                        return kept[1]
                    assert last is not None
                    raise last
                target = targets[i]
                if self.slot is not None:  # the last attempt's, given back before this one is admitted (same key?)
                    await self.release()
                if target.provider_key.rate_limit is not None:  # its provider's quota
                    seconds = self.known() if self.known is not None else 0.0
                    try:  # held from here on: an exit at any later await settles it
                        self.slot = await limiter.admit_provider(target.provider_key, clock(), seconds)
                    except errors.RateLimited as exc:  # this key's quota is spent: another target, if any
                        refused.add(i)
                        last = last if tried else exc
                        continue
                tried.add(i)
                answer, failure = await self._attempt(request, route, body, target, screen, sent, deadline)
                if answer is not None and answer.status == 401:
                    warn_refused(target.provider_key.name)
                self.answered = target if answer is not None else None
                if answer is not None and answer.status not in routing.FAILOVER_STATUSES:
                    return answer
                if routed and await limiter.failed(keys[i], model.cooldown, clock()):
                    cooling[i] = clock() + model.cooldown.cooldown_s
                    metrics.cooling(model.alias, targets, cooling)
                if answer is None:
                    last = failure
                elif not self._more(tried, refused, body):
                    if answer.status == 401:  # (closed below: its body is not relayed)
                        raise errors.upstream_auth_failed()
                    return answer  # the last attempt: relayed as it comes
                else:
                    buffered = await _read_whole(answer, app[SETTINGS].upstream.stream_idle_timeout_ms / 1000,
                                                  ex.request_id)
                    if buffered is not None:
                        kept = (target, buffered, ex.upstream_ttfb_ms)
                    else:  # dropped: as if that attempt had got no answer
                        last = errors.upstream_unavailable()
        except BaseException:
            # The request ended (the caller left, its deadline) while an answer it was failing
            # over from was still held (its cooldown recorded, its body read): that answer's
            # connection is aborted and its slot given back, or nothing ever would. (A no-op for
            # an answer read whole already.)
            if answer is not None:
                answer.close()
            if self.slot is not None:
                await self.release()
            raise

    def _more(self, tried: set[int], refused: set[int], body: Replayable) -> bool:
        """Whether another attempt may start (if a target is left to choose)."""
        if not tried:
            return True
        model = self._model
        return (len(tried) < model.retry.max_attempts and len(tried) + len(refused) < len(model.targets)
                and body.replayable())

    async def _attempt(self, request: web.Request, route: str, body: Replayable, target: Target,
                       screen: Callable[[str], None], sent: Callable[[Target], None],
                       deadline: Deadline) -> tuple[Answer | None, BaseException | None]:
        """One attempt: its answer (whatever the status), or how it failed without one."""
        ex = self._ex
        ex.upstream_model, ex.provider_key = target.model_name, target.provider_key.name
        ex.upstream_sent = ex.upstream_ttfb_ms = None  # this attempt's own: set by ``sent``, and at its answer
        begun = time.monotonic()
        def on_sent() -> None:
            sent(target)

        data, length = body.outbound(target, screen, on_sent)
        answer: Answer | None = None
        failure: errors.UpstreamFailed | None = None
        # Until ``sent``: a slot (max_connections) and a connection. The wait for a slot is held to
        # the alias's timeout, as it was when speech called sent() before the pool's send, and the
        # connect gets its own connect_timeout_ms on top (a connect that does not succeed is
        # 'connect', not 'timeout'). Without this the deadline left from reading the body (the
        # caller's idle gap) cut a request that had only queued for a slot.
        upstream = self._app[SETTINGS].upstream
        deadline.wait(((self._model.timeout_ms or upstream.timeout_ms) + upstream.connect_timeout_ms) / 1000, UPSTREAM)
        try:
            with deadline.scope():  # the attempt's own: a timeout here can fail over
                answer = await self._app[POOL].send(
                    target.urls[route], target.provider_key.auth_header, ex.request_id, body.content_type,
                    request.headers.get(hdrs.ACCEPT), data, length, on_sent if isinstance(data, bytes) else None)
            ex.upstream_ttfb_ms = _ttfb_ms(ex)
        except errors.UpstreamFailed as exc:
            failure = exc
        except TimeoutError:
            if deadline.waiting_on != UPSTREAM:  # the caller's upload went silent: not the target's fault
                raise
            failure = errors.upstream_timeout()
        finally:  # also when the request itself failed (a bad upload, the caller gone): status and error null
            kind = failure.failure if failure is not None else None
            status = answer.status if answer is not None else None
            assert ex.attempts is not None
            ex.attempts.append({"provider_key": target.provider_key.name, "upstream_model": target.model_name,
                                "status": status, "error": kind, "ms": int((time.monotonic() - begun) * 1000)})
            self._app[METRICS].attempt(self._model.alias, target.provider_key.name,
                                       kind or (str(status) if status else "aborted"))
        return answer, failure

    async def release(self, tokens: int | None = None, cost_usd: float | None = None,
                      audio_seconds: float | None = None) -> None:
        """Give back the provider key's slot and charge what the answer used; once, never raises."""
        slot, self.slot = self.slot, None
        await self._app[LIMITER].settle(slot, tokens, self._app[CLOCK](), cost_usd, audio_seconds)



def _ttfb_ms(ex: Exchange) -> int | None:
    """From the attempt's last request byte to its answer's head: None when the answer came before
    the whole request had gone (``sent`` not called yet)."""
    sent = ex.upstream_sent
    return None if sent is None else int((time.monotonic() - sent) * 1000)


class Buffered:
    """A failed attempt's answer, read whole so that its connection could go back to the pool: it
    is relayed as it came if no later attempt gets an answer."""

    __slots__ = ("_body", "headers", "status")

    def __init__(self, status: int, headers: CIMultiDictProxy[str], body: bytes) -> None:
        self.status, self.headers, self._body = status, headers, body

    ready = True  # read whole

    async def read(self) -> bytes:
        body, self._body = self._body, b""
        return body

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


BUFFER_LIMIT = 64 * 1024  # a failed answer's body (an error envelope) kept for relaying at most


async def _read_whole(answer: Answer, idle: float, request_id: str) -> Buffered | None:
    """The answer with its body, or None (and the connection aborted) when the body is larger
    than BUFFER_LIMIT, does not come within ``idle`` or breaks.

    An upload still streaming while this answer came (an early answer) may fail meanwhile on the
    caller's side (a bad form, the body cap, the caller gone): that ends the request with its
    own error, as it would have without this answer, and no other attempt follows."""
    body = bytearray()
    try:
        async with asyncio.timeout(idle):
            while chunk := await answer.read():
                body += chunk
                if len(body) > BUFFER_LIMIT:
                    answer.close()
                    raise_upload_error(answer, request_id)
                    return None
    except (TimeoutError, ConnectionError):
        answer.close()
        raise_upload_error(answer, request_id)
        return None
    raise_upload_error(answer, request_id)
    answer.release()
    return Buffered(answer.status, answer.headers, bytes(body))

