"""``GET /v1/realtime``: a live session relayed between the caller's WebSocket and the provider's,
under the keys, aliases, limits, guardrails and records of the audio routes.

The order, as in pipeline.py: authenticate (401; ``Authorization: Bearer`` or the browser's
``openai-insecure-api-key.<key>`` subprotocol) -> a WebSocket upgrade (426) -> the ``model``
alias (404/403/400), or ``intent=transcription`` without one -> admit (429) -> connect upstream,
failing over between the alias's targets on connect failures only -> upgrade the caller -> relay
until either side closes -> ``finally``: close both, give back the slots, one usage event.
Refusals before the upgrade are HTTP envelopes; after it the gateway speaks in ``error`` events
and close codes. A transcription session that names no ``model`` connects once its
``session.update`` names the transcription model; what the caller sends before that is held (up
to ``PENDING_LIMIT``). A session that has started is never moved to another target.

Frames pass one at a time each way, as they arrive: a frame is read from one side only once the
previous one was handed to the other, and aiohttp's writer waits for its socket to drain past
64 KiB, so a reader that stops stalls the pump feeding it; that pump stops reading its side,
whose queue aiohttp pauses at 128 KiB, and TCP does the rest. Memory per session is bounded by a
frame each way (``MAX_FRAME``) plus those buffers. Text frames stay bytes (``decode_text=False``);
only the few client events realtime_frames.py names are parsed.

Every ``proxy.realtime_heartbeat_ms`` both sides are pinged; a side that has not answered the
previous ping by then, while its pump has been free to read the answer for half an interval, is
gone, though its TCP connection may look open for many minutes (a laptop closed, a NAT that
forgot the flow), and the session ends: it must not hold its concurrency slot until a drain. One
timer per session, and pings and pongs handled in the pumps (``autoping=False``): aiohttp's own
heartbeat re-arms a timer for every frame received, which cost about 8 % of a core at 400
sessions.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

import aiohttp
from aiohttp import WebSocketError, WSMsgType, hdrs, web

from . import aliases, auth, errors, failover, guardrails, pricing, routing, usage
from . import realtime_frames as frames
from .config import ApiKey, Guardrail, Model, Resources, Target
from .exchange import Exchange
from .keys import CLOCK, EXCHANGE, LIMITER, LIVE, METRICS, REQUEST_ID, SETTINGS, USAGE, WS_CLIENT
from .limits_plan import Limit, rejection
from .realtime_account import Account
from .responses import stamp

log = logging.getLogger(__name__)

ROUTE = "realtime"
MAX_FRAME = 16 * 1024 * 1024  # a frame either way; the Realtime API's largest (an audio append) is 15 MiB
# (aiohttp's max_msg_size refuses a message of that size itself: it is given MAX_FRAME + 1)
PENDING_LIMIT = 1024 * 1024  # frame bytes held while a transcription session has no upstream yet
HELD_OVERHEAD = 128  # what holding one more frame costs besides its payload (an empty frame is 6 bytes on the wire)
CLOSE_TIMEOUT_S = 5.0  # for the peer's answer to a close frame
KEY_PROTOCOL = "openai-insecure-api-key."
CALLER, UPSTREAM, GATEWAY = "caller", "upstream", "gateway"  # who ended a session
NORMAL = frozenset({1000, 1001, 1005})  # close codes that end a session without an error
NO_STATUS = 1005  # a close frame without a code (a browser's ws.close()); aiohttp reports it as 0
BROKE_PROTOCOL = frozenset({1002, 1007, 1009})  # what aiohttp closes a caller with for a bad frame
_TEXT, _BINARY, _PING, _PONG = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.PING, WSMsgType.PONG


async def client(app: web.Application) -> AsyncIterator[None]:
    """The upstream WebSocket client for the life of the app (a cleanup_ctx).

    No connection limit: sessions are bounded by the callers' concurrency limits, and a limit here
    would make a session wait silently for another to end. No cookie jar: one caller's session must
    never carry cookies an upstream set for another's."""
    connect = app[SETTINGS].upstream.connect_timeout_ms / 1000
    session = app[WS_CLIENT] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect), auto_decompress=False,
        middlewares=(_no_redirects,))
    yield
    await session.close()


async def _no_redirects(request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
    """A handshake answered with a redirect is refused with that status, as the audio routes'
    client does: aiohttp would follow it to any host, and drops only ``Authorization`` on the way
    (an Azure provider key is an ``api-key`` header). ``ws_connect`` has no switch for it."""
    response = await handler(request)
    if 300 <= response.status < 400:
        response.close()
        raise aiohttp.WSServerHandshakeError(response.request_info, (response,), status=response.status,
                                             message="redirect not followed", headers=response.headers)
    return response


@dataclass(slots=True)
class End:
    """How a session ended: who ended it, with which close code (None: no close frame came)."""

    by: str
    code: int | None
    reason: bytes = b""
    error_code: str | None = None
    upstream_code: int | None = None  # the code the upstream is told, when not the one above


class _Caller(web.WebSocketResponse):
    """The caller's side, remembering the code of the first close sent to it. aiohttp closes a
    caller whose frame broke the protocol (1009 over MAX_FRAME, 1002) from inside ``receive()``,
    and the connection usually ends (cancelling the handler) before that frame's ERROR reaches
    the pump: the code is how the record tells that from a caller that left."""

    first_close: int | None = None

    async def close(self, *, code: int = 1000, message: bytes = b"", drain: bool = True) -> bool:
        if self.first_close is None:
            self.first_close = code
        return await super().close(code=code, message=message, drain=drain)


class Refused(Exception):
    """A client event the gateway answers with an ``error`` event instead of forwarding."""

    def __init__(self, code: str, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.code, self.message, self.kind = code, message, kind
        self.event_id: str | None = None  # the refused client event's, echoed in the error event


async def session(request: web.Request) -> web.StreamResponse:
    """The handler: every stage in order; what happens to frames is Session's."""
    app = request.app
    live, clock, metrics = app[LIVE], app[CLOCK], app[METRICS]
    resources = live.resources  # this session's snapshot, whatever a reload does meanwhile
    ex = request[EXCHANGE] = Exchange(ROUTE, request[REQUEST_ID], clock(), time.monotonic())
    s = Session(request, ex, resources)
    live.enter()
    live.sessions.add(s)  # the drain's deadline ends it, relaying or not
    try:
        try:
            cors, origin = app[SETTINGS].proxy.cors, request.headers.get(hdrs.ORIGIN)
            if cors is not None and origin is not None and not cors.allows(origin):
                # A WebSocket has no preflight: a page on an origin proxy.cors does not list is
                # refused here, as its fetch() calls are (403, before the key is looked at).
                raise errors.origin_not_allowed()
            offered = _offered(request)
            key = auth.lookup(_authorization(request, offered), resources.keys_by_hash)
            ex.api_key = key.name
            auth.check_active(key, clock())
            s.key = key
            if "realtime" not in offered and any(p.startswith(KEY_PROTOCOL) for p in offered):
                # A browser fails a handshake whose answer chooses none of its subprotocols: refused
                # here, before an upstream session is opened (and counted) for nothing.
                raise errors.invalid_request("missing_subprotocol", "A WebSocket that sends its key as a "
                                             "subprotocol must offer the 'realtime' subprotocol too.")
            caller = _Caller(
                protocols=("realtime",), autoclose=False, autoping=False, max_msg_size=MAX_FRAME + 1,
                compress=False, timeout=CLOSE_TIMEOUT_S, decode_text=False)
            # HEAD and HTTP/1.0 cannot upgrade (RFC 6455 wants a GET of HTTP/1.1), whatever
            # aiohttp's check lets through.
            if request.method != "GET" or request.version < (1, 1) or not caller.can_prepare(request).ok:
                raise errors.GatewayError(426, "invalid_request_error", "websocket_required",
                                          "GET /v1/realtime must be a WebSocket upgrade.",
                                          headers={"Upgrade": "websocket"})
            alias = request.query.get("model") or None
            s.intent = request.query.get("intent") or None
            if alias is not None:
                ex.model = aliases.recorded(alias, resources.models)
                s.model = aliases.resolve(alias, key, resources.models, ROUTE)
                s.known(s.model)
                s.account.slot = await app[LIMITER].admit(key, s.model, clock())
                await s.connect(s.model, named=True)
            elif s.intent == "transcription":
                s.transcription_only = True
                s.account.slot = await app[LIMITER].admit_key(key, clock())
            else:
                raise errors.invalid_request(
                    "missing_model", "The 'model' query parameter is required (or intent=transcription).", "model")
        except errors.GatewayError as exc:
            ex.status, ex.error_code, ex.bytes_out = exc.status, exc.code, len(exc.body())
            if isinstance(exc, errors.RateLimited):
                metrics.limited(exc.scope)
            raise
        stamp(request, caller)
        await caller.prepare(request)
        s.upgraded(caller)
        await s.run()
        return caller
    except asyncio.CancelledError:  # the caller left (handler_cancellation), unless it was closing
        if s.ended is None:
            broke = s.caller.first_close if s.caller is not None else None
            if broke in BROKE_PROTOCOL:  # aiohttp closed it for a bad frame; its close ended the connection
                ex.close_code, ex.error_code = broke, "client_protocol_error"
            elif s.caller_close is not None:
                # Its close frame came, then its connection ended before the close was handed on: a
                # browser tab going away (closed, reloaded, navigated) sends 1001 and goes at once.
                s.ended = s.caller_close
                ex.close_code = s.caller_close.code
            elif s.cut:  # the drain's deadline, during its upstream handshake
                ex.status, ex.error_code = ex.status or 503, "shutting_down"
            else:
                ex.status, ex.error_code = ex.status or 499, ex.error_code or "client_closed"
        raise
    except ConnectionError:  # the caller left during the upgrade
        ex.status, ex.error_code = ex.status or 499, "client_closed"
        return s.caller or web.Response(status=499)  # nobody reads it
    except Exception as exc:
        if isinstance(exc, errors.GatewayError):
            raise
        log.error("realtime %s: unhandled error", ex.request_id, exc_info=exc)
        ex.error_code = "internal_error"
        if s.caller is None:
            ex.status = 500
            raise errors.internal_error() from None
        await asyncio.gather(s.caller.close(code=1011), return_exceptions=True)
        return s.caller
    finally:
        await s.finish()


def _offered(request: web.Request) -> list[str]:
    """The subprotocols the caller offered, from every Sec-WebSocket-Protocol line."""
    return [p for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
            for p in (p.strip() for p in value.split(",")) if p]


def _authorization(request: web.Request, offered: list[str]) -> str | None:
    """The Authorization header, or the browser form's key subprotocol made into one."""
    header = request.headers.get(hdrs.AUTHORIZATION)
    if header is not None:
        return header
    for proto in offered:
        if proto.startswith(KEY_PROTOCOL):
            return "Bearer " + proto[len(KEY_PROTOCOL):]
    return None


def _forwarded_protocols(request: web.Request) -> list[str]:
    """The caller's subprotocols the upstream may see: the beta marker, never the key."""
    return [p for p in _offered(request) if p.startswith("openai-beta.")]


def _beyond_transcription(event: frames.ClientEvent) -> bool:
    """Whether an event asks a transcription session for what it does not do: a response, or a
    session.update to another session type."""
    if event.type == frames.RESPONSE_CREATE:
        return True
    if event.type != frames.SESSION_UPDATE:
        return False
    session = event.doc.get("session")
    kind = session.get("type", "transcription") if isinstance(session, dict) else "transcription"
    return kind != "transcription"


def _upstream_url(target: Target, intent: str | None, named: bool) -> str:
    """The target's realtime URL; without a model named in the URL (a transcription session
    whose model comes in session.update), without the model or deployment parameter."""
    url = target.urls[ROUTE]
    if not named:
        path, _, query = url.partition("?")
        params = [p for p in query.split("&") if not p.startswith(("model=", "deployment="))]
        url = path + ("?" + "&".join(params) if params else "")
    if intent is not None:
        url += ("&" if "?" in url else "?") + "intent=" + quote(intent, safe="")
    return url


def _sendable(code: int | None, otherwise: int) -> int:
    """A code that may go in a close frame (1005, 1006 and 1015 only describe one that did not)."""
    if code is None or code in (1006, 1015):
        return otherwise
    if code == 1005:
        return 1000
    return code if (1000 <= code <= 1014 and code != 1004) or 3000 <= code <= 4999 else otherwise


def _gone(by: str) -> End:
    """A side whose connection ended without a close frame (it went, or broke the protocol)."""
    return End(by, None, error_code="client_closed" if by == CALLER else "upstream_aborted")


def _silent(by: str) -> End:
    """A side that did not answer a heartbeat's ping."""
    return End(by, None, error_code="client_timeout" if by == CALLER else "upstream_timeout")


def _retrieved(task: asyncio.Future[None]) -> None:
    """A ping that could not be sent: the pump reading that side finds out."""
    if not task.cancelled():
        task.exception()


def _reason(extra: object) -> bytes:
    reason = extra.encode() if isinstance(extra, str) else extra if isinstance(extra, bytes) else b""
    return reason[:123]  # what fits in a close frame


class Session:
    """One session's sockets, slots and counts; the pumps that relay between its two sides."""

    def __init__(self, request: web.Request, ex: Exchange, resources: Resources) -> None:
        app = request.app
        self.request, self.ex, self.resources = request, ex, resources
        self.app, self.limiter, self.clock, self.metrics = app, app[LIMITER], app[CLOCK], app[METRICS]
        self.heartbeat = app[SETTINGS].proxy.realtime_heartbeat_ms / 1000 or None  # seconds between pings
        self.key: ApiKey | None = None
        self.model: Model | None = None  # the session's model: ?model=, else the transcription model
        self.transcription_alias: str | None = None  # the last one a session.update named
        self.intent: str | None = None
        # Opened with ?intent=transcription and no ?model: transcriptions only. A response (or a
        # session.update to another type) would run on whatever model the provider defaults to,
        # which no alias names, so no key's access, limits or prices were checked for it.
        self.transcription_only = False
        self.target: Target | None = None
        self.account = Account(ex, self.limiter, self.clock)  # slots, usage, responses under way
        self.caller: _Caller | None = None
        self.upstream: aiohttp.ClientWebSocketResponse[Literal[False]] | None = None
        self.connected = asyncio.Event()
        self.inputs: tuple[Guardrail, ...] = ()
        self.outputs: tuple[Guardrail, ...] = ()
        self.upstream_code = 0  # the close code the upstream is owed, once collected (finish); 0: none yet
        # frames held, with the texts and event_id of a parsed one (screened again on the flush)
        self.pending: list[tuple[bytes, WSMsgType, frames.ClientEvent | None]] = []
        self.pending_bytes = 0
        self.began: float | None = None  # monotonic, at the upgrade
        self.ended: End | None = None  # once the session is closing
        self.caller_close: End | None = None  # the caller's close frame, once read
        self.cut = False  # the drain's deadline came before it was relaying
        self._stop: asyncio.Future[End] | None = None  # an end that comes from outside the pumps
        # The heartbeat: sides that owe the pong of the last ping, and the pumps waiting in receive()
        # (a pump stuck handing a frame to the other side cannot read its side's pong).
        self._owes = {CALLER: False, UPSTREAM: False}
        self._reading = {CALLER: 0.0, UPSTREAM: 0.0}  # since when (monotonic), 0.0: not in receive()
        self._beat: asyncio.TimerHandle | None = None

    # -- before the upgrade ------------------------------------------------------------------

    def known(self, model: Model) -> None:
        """An alias with one target names its upstream model and provider key before any attempt
        (as on the audio routes); with several, the attempt that connects does."""
        if len(model.targets) == 1:
            only = model.targets[0]
            self.ex.upstream_model, self.ex.provider_key = only.model_name, only.provider_key.name

    async def connect(self, model: Model, named: bool) -> None:
        """Open the upstream WebSocket to one of the model's targets, failing over on connect
        failures (routing.py's choice, cooldowns and provider-key limits); raises the caller's
        envelope when none connects."""
        app, ex, limiter, clock = self.app, self.ex, self.limiter, self.clock
        targets = model.targets
        routed = len(targets) > 1 and model.retry.max_attempts > 1
        keys = model.cooldown_keys
        cooling = await limiter.cooling(keys, clock()) if routed else {}
        tried: set[int] = set()
        refused: set[int] = set()
        ex.attempts = []
        last: errors.GatewayError | None = None
        timeout = (model.timeout_ms or app[SETTINGS].upstream.timeout_ms) / 1000
        while True:
            more = not tried or len(tried) < model.retry.max_attempts
            i = routing.choose(model, tried, cooling, refused, random.random) if more else None
            if i is None:
                raise last or errors.upstream_unavailable()
            target = targets[i]
            try:
                slot = await limiter.admit_provider(target.provider_key, clock())
            except errors.RateLimited as exc:
                refused.add(i)
                last = last if tried else exc
                continue
            tried.add(i)
            failure, status, began = None, None, time.monotonic()
            try:
                async with asyncio.timeout(timeout):
                    self.upstream = await self._open(target, named)
            except asyncio.CancelledError:  # the caller left during the handshake: the attempt is recorded
                ex.attempts.append({"provider_key": target.provider_key.name, "upstream_model": target.model_name,
                                    "status": None, "error": None, "ms": int((time.monotonic() - began) * 1000)})
                self.metrics.attempt(model.alias, target.provider_key.name, "aborted")
                self.account.provider_slot = slot  # given back with the others, whatever cancels finish()
                raise
            except aiohttp.WSServerHandshakeError as exc:
                status = exc.status if exc.status != 101 else None
                failure = routing.RESET if status is None else None
                last = errors.upstream_unavailable() if status is None else _refusal(status, exc.headers)
                if status == 401:
                    failover.warn_refused(target.provider_key.name)
            except TimeoutError:
                failure, last = routing.TIMEOUT, errors.upstream_timeout()
            except (aiohttp.ClientError, OSError):
                failure, last = routing.CONNECT, errors.upstream_unavailable("connect")
            ex.attempts.append({"provider_key": target.provider_key.name, "upstream_model": target.model_name,
                                "status": 101 if self.upstream is not None else status, "error": failure,
                                "ms": int((time.monotonic() - began) * 1000)})
            self.metrics.attempt(model.alias, target.provider_key.name, failure or str(status or 101))
            if self.upstream is not None:
                self.target, self.account.provider_slot = target, slot
                self.account.tally.priced_by(pricing.prices_of(model, target))
                ex.upstream_model, ex.provider_key = target.model_name, target.provider_key.name
                self.connected.set()
                return
            await limiter.settle(slot, None, clock())
            if routed and await limiter.failed(keys[i], model.cooldown, clock()):
                cooling[i] = clock() + model.cooldown.cooldown_s
                self.metrics.cooling(model.alias, targets, cooling)
            if status is not None and status not in routing.FAILOVER_STATUSES and last is not None:
                raise last  # the upstream refused this session: another target would too

    async def _open(self, target: Target, named: bool) -> aiohttp.ClientWebSocketResponse[Literal[False]]:
        name, _, value = target.provider_key.auth_header.partition(": ")
        headers = {name: value, "x-aisix-request-id": self.ex.request_id}
        beta = self.request.headers.get("OpenAI-Beta")
        if beta is not None:
            headers["OpenAI-Beta"] = beta
        return await self.app[WS_CLIENT].ws_connect(
            _upstream_url(target, self.intent, named), protocols=_forwarded_protocols(self.request),
            headers=headers, autoclose=False, autoping=False, max_msg_size=MAX_FRAME + 1, compress=0,
            decode_text=False, timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT_S))

    def upgraded(self, caller: _Caller) -> None:
        self.caller, self.began = caller, time.monotonic()
        self.ex.status, self.ex.stream = 101, True
        self.metrics.sessions_open.inc()
        self._rules()

    def _rules(self) -> None:
        self.inputs, self.outputs = self._rules_with(self.transcription_alias)

    def _rules_with(self, transcription_alias: str | None) -> tuple[tuple[Guardrail, ...], tuple[Guardrail, ...]]:
        """The (input, output) guardrails of the session's model and of this transcription
        model, if another."""
        names = {m for m in (self.ex.model, transcription_alias) if m is not None and m in self.resources.models}
        inputs: list[Guardrail] = []
        outputs: list[Guardrail] = []
        for alias in sorted(names):
            inputs += [g for g in guardrails.rules_for(self.resources, alias, guardrails.INPUT) if g not in inputs]
            outputs += [g for g in guardrails.rules_for(self.resources, alias, guardrails.OUTPUT) if g not in outputs]
        return tuple(inputs), tuple(outputs)

    # -- the relay ---------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        up = asyncio.create_task(self._from_caller())
        down = asyncio.create_task(self._from_upstream())
        if self.heartbeat:
            self._beat = loop.call_later(self.heartbeat, self._heartbeat)
        try:
            await asyncio.wait((up, down, self._stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self._beat is not None:
                self._beat.cancel()
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
        if self._stop.done():
            end = self._stop.result()
        else:
            first = up if up.done() and not up.cancelled() else down
            end = first.result()
        await self._close(end)

    def end(self, code: int) -> None:
        """Close both sides with ``code`` (the drain's deadline); a session not relaying yet (in
        its upstream handshake) is cut there."""
        if self._stop is None:
            self.cut = True
            self.request.task.cancel()
            return
        self._halt(End(GATEWAY, code, b"server going away", "shutting_down"))

    def _halt(self, end: End) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(end)

    def _heartbeat(self) -> None:
        """A side that still owes the last ping's pong, and whose pump has been free to read it
        for half an interval at least (not just back from handing on a backlog), is gone; else
        both are pinged again."""
        assert self.heartbeat is not None
        sides = ((CALLER, self.caller), (UPSTREAM, self.upstream))
        waited = time.monotonic() - self.heartbeat / 2
        for by, ws in sides:
            since = self._reading[by]
            if ws is not None and self._owes[by] and 0.0 < since <= waited:
                self._halt(_silent(by))
                return
        for by, ws in sides:
            if ws is not None and not ws.closed:
                self._owes[by] = True
                task = asyncio.ensure_future(ws.ping())
                task.add_done_callback(_retrieved)
        self._beat = asyncio.get_running_loop().call_later(self.heartbeat, self._heartbeat)

    async def _from_caller(self) -> End:
        caller = self.caller
        assert caller is not None
        frames_in, bytes_in = self.metrics.frames_in, self.metrics.frame_bytes_in
        ex = self.ex
        reading, monotonic = self._reading, time.monotonic
        while True:
            reading[CALLER] = monotonic()
            msg = await caller.receive()
            reading[CALLER] = 0.0
            kind = msg.type
            if kind is _TEXT or kind is _BINARY:
                data: bytes = msg.data
                ex.bytes_in += len(data)
                frames_in.inc()
                bytes_in.inc(len(data))
                if kind is _TEXT and not frames.valid_text(data):  # the caller's fault, not the upstream's
                    return End(CALLER, 1007, b"invalid UTF-8 in a text frame", "client_protocol_error", 1001)
                event = None
                if frames.needs_reading(data, kind is _BINARY):
                    try:
                        data, event = await self._checked(data, kind)
                    except Refused as exc:
                        if not await self._tell(frames.error_event(exc.code, exc.message, exc.event_id, exc.kind)):
                            return _gone(CALLER)
                        continue
                    except _Ending as stop:
                        return stop.end
                upstream = self.upstream
                if upstream is None:  # a transcription session that has not named its model yet
                    held = len(data) + HELD_OVERHEAD
                    if self.pending_bytes + held > PENDING_LIMIT:
                        await self._tell(frames.error_event(
                            "session_not_configured", "Name the transcription model in session.update "
                            "before sending audio.", None))
                        return End(GATEWAY, 1008, b"session not configured", "session_not_configured")
                    self.pending.append((data, kind, event.held() if event is not None else None))
                    self.pending_bytes += held
                    continue
                if event is not None and event.type == frames.RESPONSE_CREATE:
                    self.account.asked += 1  # before the send: a caller leaving while it waits has sent it
                try:
                    await upstream.send_frame(data, kind)
                except ConnectionError:
                    return _gone(UPSTREAM)
            elif kind is _PONG or kind is _PING:
                if not await self._control(CALLER, caller, kind, msg.data):
                    return _gone(CALLER)
            elif kind is WSMsgType.CLOSE:
                end = self.caller_close = End(CALLER, msg.data or NO_STATUS, _reason(msg.extra))
                return end
            elif kind is WSMsgType.ERROR and isinstance(msg.data, WebSocketError):
                # A frame that broke the protocol (over MAX_FRAME, a reserved close code): aiohttp
                # has closed the caller with the code that says why; the upstream is told 1001.
                return End(CALLER, msg.data.code, error_code="client_protocol_error", upstream_code=1001)
            else:  # the connection ended without a close frame
                return _gone(CALLER)

    async def _from_upstream(self) -> End:
        await self.connected.wait()
        caller, upstream = self.caller, self.upstream
        assert caller is not None and upstream is not None
        frames_out, bytes_out = self.metrics.frames_out, self.metrics.frame_bytes_out
        ex = self.ex
        reading, monotonic = self._reading, time.monotonic
        while True:
            reading[UPSTREAM] = monotonic()
            msg = await upstream.receive()
            reading[UPSTREAM] = 0.0
            kind = msg.type
            if kind is _TEXT or kind is _BINARY:
                data: bytes = msg.data
                # Accounted before it is handed on: once read from the upstream, a report is the
                # session's, whether or not the caller stays to take it (a relay cut short by its
                # leaving lost the usage, and left its response seeming under way for collect()).
                over = await self._reported(data) if kind is _TEXT and frames.reports(data) else None
                try:
                    await caller.send_frame(data, kind)
                except ConnectionError:
                    return _gone(CALLER)
                ex.bytes_out += len(data)
                frames_out.inc()
                bytes_out.inc(len(data))
                if over:
                    return await self._over(over)
            elif kind is _PONG or kind is _PING:
                if not await self._control(UPSTREAM, upstream, kind, msg.data):
                    return _gone(UPSTREAM)
            elif kind is WSMsgType.CLOSE:
                code = msg.data or NO_STATUS
                return End(UPSTREAM, code, _reason(msg.extra), None if code in NORMAL else "upstream_error")
            else:
                return _gone(UPSTREAM)

    async def _control(self, by: str, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse[Literal[False]],
                       kind: WSMsgType, data: bytes) -> bool:
        """A ping or pong from one side (autoping=False: the pongs are the heartbeat's): a pong
        pays what that side owes, a ping is answered; False when that side is gone."""
        if kind is _PONG:
            self._owes[by] = False
            return True
        try:
            await ws.pong(data)
        except ConnectionError:
            return False
        return True

    async def _tell(self, event: bytes) -> bool:
        """Send the caller an event of the gateway's own; False when the caller is gone."""
        assert self.caller is not None
        try:
            await self.caller.send_frame(event, _TEXT)
        except ConnectionError:
            return False
        self.ex.bytes_out += len(event)
        self.metrics.frames_out.inc()
        self.metrics.frame_bytes_out.inc(len(event))
        return True

    async def _checked(self, data: bytes, kind: WSMsgType) -> tuple[bytes, frames.ClientEvent | None]:
        """A client event the gateway checks, as it goes upstream, and that event; raises Refused."""
        if frames.too_many_values(data):
            if kind is _BINARY and not frames.valid_text(data) and not frames.other_encoding(data) \
                    and not frames.opens_an_object(data):
                return data, None  # audio, which no JSON reader takes for an event
            # Parsed whole, it would cost the gateway thirty times its size, on the event loop.
            # Binary that is not UTF-8 too, once it opens an object: a lax reader upstream takes
            # invalid UTF-8 for U+FFFD (frames.lax_object).
            raise Refused("event_too_complex", f"The event holds more than {frames.MAX_VALUES} JSON values.")
        event = frames.parse_client(data)
        if event is None:
            if kind is _BINARY and not frames.lax_object(data):
                return data, None  # audio that happened to look like JSON at first
            # Text that names a checked event but that orjson cannot read: a laxer parser upstream
            # (a byte order mark, a comment) could still take it for that event; so could binary
            # that a JSON reader of bytes takes for an object (another encoding, a NaN).
            raise Refused("invalid_json", "The event is not a JSON object.")
        try:
            return await self._screened(event), event
        except Refused as exc:
            exc.event_id = event.event_id
            raise

    async def _screened(self, event: frames.ClientEvent) -> bytes:
        """The frame to send on, checked; raises Refused. What it changes (the transcription
        model's guardrails and prices) holds only once the whole frame has passed."""
        if event.clash is not None:
            raise Refused("invalid_json", f"The event has a key that differs from '{event.clash}' only in case.")
        if self.transcription_only and _beyond_transcription(event):
            raise Refused("model_not_supported", "A transcription session (?intent=transcription) has no "
                          "responses and keeps its type: open a session with ?model=<alias> for them.")
        last: tuple[str, Model, Target] | None = None
        for named in event.transcription_models:  # each one: a second must not pass unchecked
            alias = _model_value(named)
            model, target = await self._transcription_model(alias, event.event_id)
            if last is not None and model is not last[1]:
                # Which one the provider reads depends on its version: the gateway would price and
                # guard the transcriptions by one while the provider uses the other.
                raise Refused("model_not_supported", "The event names two different transcription models.")
            named.rewrite(target.model_name)
            last = (alias, model, target)
        if event.session_model is not None:
            event.session_model.rewrite(self._session_model(_model_value(event.session_model)))
        inputs, outputs = self._rules_with(last[0]) if last is not None else (self.inputs, self.outputs)
        # (in a transcription session whose model is not named yet, there are no rules: a frame
        # held is screened again by its model's once that is named, in _flush_pending)
        self._screen(inputs, event.texts)
        if last is not None:
            alias, model, target = last
            own = model is self.model
            if not own:
                await self._admit_transcriber(model)
            self.transcription_alias, self.inputs, self.outputs = alias, inputs, outputs
            self.account.transcriber = None if own else model
            self.account.tally.transcribed_by(pricing.prices_of(model, target), own=own)
        return event.encode()

    async def _admit_transcriber(self, model: Model) -> None:
        """Account.admit_transcriber; raises Refused when that model's limits refuse."""
        try:
            await self.account.admit_transcriber(model)
        except errors.RateLimited as exc:
            self.metrics.limited(exc.scope)
            raise Refused(exc.code, exc.message, "rate_limit_error") from None

    def _screen(self, inputs: tuple[Guardrail, ...], texts: list[str]) -> None:
        """The input guardrails on an event's texts: a match noted, a block raises Refused."""
        verdict = None
        for text in texts:
            verdict = guardrails.check(inputs, text) or verdict
            if verdict is not None and verdict.action == guardrails.BLOCKED:
                break
        if verdict is not None:
            self.ex.verdict = verdict if verdict.action == guardrails.BLOCKED or self.ex.verdict is None \
                else self.ex.verdict
            if verdict.action == guardrails.BLOCKED:
                blocked = errors.GuardrailBlocked(verdict.guardrail)
                raise Refused(blocked.code, blocked.message)

    async def _transcription_model(self, alias: str, event_id: str | None) -> tuple[Model, Target]:
        """The model of a transcription alias named in session.update and the target (on the
        session's provider key) whose upstream model name goes in its place; in a session that has
        no upstream yet, that model's target is connected to."""
        assert self.key is not None
        try:
            model = aliases.resolve(alias, self.key, self.resources.models, ROUTE)
        except errors.GatewayError as exc:
            raise Refused(exc.code, exc.message) from None
        if self.upstream is None:
            try:
                self.account.model_slot = await self.limiter.admit_model(model, self.clock())
            except errors.RateLimited as exc:
                self.metrics.limited(exc.scope)
                raise Refused(exc.code, exc.message, "rate_limit_error") from None
            self.ex.model = alias
            self.model = model
            self.known(model)
            try:
                await self.connect(model, named=False)
            except errors.GatewayError as exc:
                await self._tell(frames.error_event(exc.code, exc.message, event_id, exc.type))
                raise _Ending(End(GATEWAY, 1014, b"upstream unavailable", exc.code)) from None
            # The session's model is chosen now, whatever becomes of this frame: its guardrails
            # hold from here on, not only once a frame naming it has passed.
            self._rules()
            await self._flush_pending()
        assert self.target is not None
        if model is self.model:
            return model, self.target
        same = [t for t in model.targets if t.provider_key is self.target.provider_key]
        if not same:
            raise Refused("model_not_supported",
                          f"The model '{alias}' cannot be used in this session: it is served by another provider.")
        return model, same[0]

    def _session_model(self, name: str) -> str:
        """The upstream model name for a session.update's ``session.model``: the session's own
        alias (or that name already), since a session cannot move to another model."""
        model, target = self.model, self.target
        if model is not None and target is not None and name in (model.alias, target.model_name):
            return target.model_name
        raise Refused("model_not_supported", f"This session's model cannot be changed to '{name[:128]}': "
                      "open another session with ?model=<alias>.")

    async def _flush_pending(self) -> None:
        assert self.upstream is not None
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        inputs = self.inputs  # the model's, now that it is named
        for data, kind, event in pending:
            if event is not None and event.texts:
                try:
                    self._screen(inputs, event.texts)
                except Refused as exc:
                    if not await self._tell(frames.error_event(exc.code, exc.message, event.event_id, exc.kind)):
                        raise _Ending(_gone(CALLER)) from None
                    continue
            try:
                await self.upstream.send_frame(data, kind)
            except ConnectionError:
                raise _Ending(_gone(UPSTREAM)) from None

    async def _reported(self, data: bytes) -> list[Limit]:
        """Usage and transcripts from a server event: tokens charged now, a transcript checked
        by the output guardrails (recorded only: it is sent on); the windows it took over their
        limit (``_over``, once the event is relayed)."""
        report = frames.parse_server(data)
        ex = self.ex
        if report.transcript and self.outputs:
            verdict = guardrails.check(self.outputs, report.transcript)
            if verdict is not None and ex.verdict is None:
                ex.verdict = guardrails.Verdict(verdict.guardrail, guardrails.MONITORED)
        return await self.account.account(report)

    async def _over(self, over: list[Limit]) -> End:
        """A token window over its limit ends the session with 1008 after an ``error`` event."""
        now = self.clock()
        refusal = rejection(over, now)
        self.metrics.limited(refusal.scope)
        await self._tell(frames.error_event(refusal.code, refusal.message, None, refusal.type))
        return End(GATEWAY, 1008, b"rate limit exceeded", refusal.code)

    async def _close(self, end: End) -> None:
        """Close both sides as ``end`` says: a close frame is relayed with its code and reason; a
        side that vanished is told 1001 (the caller went) or 1014 (the upstream did)."""
        caller, upstream, ex = self.caller, self.upstream, self.ex
        assert caller is not None
        if end.by == CALLER:
            to_caller = to_upstream = _sendable(end.code, 1001)
        elif end.by == UPSTREAM:
            to_caller = to_upstream = _sendable(end.code, 1014)
        else:
            to_caller = to_upstream = end.code or 1011
        to_upstream = end.upstream_code or to_upstream
        ex.close_code = end.code if end.by == CALLER and end.code is not None else to_caller
        if end.error_code is not None:
            ex.error_code = end.error_code
        self.ended = end
        if end.by == CALLER and self.account.under_way:
            # Responses still in progress: the caller is answered now, and finish() collects
            # their usage before it closes the upstream with the caller's code.
            self.upstream_code = to_upstream
            await _closed(caller, to_caller, end.reason)
            return
        # The upstream first: once the caller's transport closes, aiohttp cancels this handler.
        if upstream is not None:
            await asyncio.gather(upstream.close(code=to_upstream, message=end.reason), return_exceptions=True)
        await _closed(caller, to_caller, end.reason)

    # -- the end -----------------------------------------------------------------------------

    async def finish(self) -> None:
        """Every session ends here exactly once: sockets closed, slots given back, one event."""
        ex, app = self.ex, self.app
        # The caller's transport closing cancels this handler, maybe during an await here: the
        # slots are settled first (settle_all goes through a cancellation), the record always.
        # A session that never reached an upstream (refused before the upgrade, or a transcription
        # session whose upstream could not be opened) costs nothing.
        cancelled: asyncio.CancelledError | None = None
        try:
            await self.account.collect(self.upstream)  # what responses the caller left under way cost
        except asyncio.CancelledError as exc:  # the caller's transport closed meanwhile
            cancelled = exc
        except Exception as exc:  # noqa: BLE001 (the slots and the record come first)
            log.error("realtime %s: collecting its responses failed", ex.request_id, exc_info=exc)
        try:
            await self.account.settle(priced=self.target is not None)
            if self.upstream is not None and not self.upstream.closed:  # cancelled, failed mid-way, collected
                said = self.caller_close  # a caller that closed and left at once: its code goes on
                code = self.upstream_code or (_sendable(said.code, 1001) if said is not None else 1001)
                await asyncio.gather(self.upstream.close(code=code, message=said.reason if said else b""),
                                     return_exceptions=True)
        finally:
            ex.latency_ms = int((time.monotonic() - ex.started) * 1000)
            app[USAGE].emit(usage.event(ex))
            seconds = None
            if self.began is not None:
                seconds = time.monotonic() - self.began
                self.metrics.sessions_open.dec()
            self.metrics.session_finished(ex, ex.model in self.resources.models, seconds)
            app[LIVE].sessions.discard(self)
            app[LIVE].leave()
        if cancelled is not None:
            raise cancelled


async def _closed(caller: _Caller, code: int, reason: bytes) -> None:
    """The caller closed with ``code``, waiting at most CLOSE_TIMEOUT_S in all: its close frame
    waits for room in the socket (aiohttp's drain has no bound), and the answer for the peer's.
    A caller that has stopped reading is cut off then, not held with its session's slots."""
    await asyncio.gather(asyncio.wait_for(caller.close(code=code, message=reason), CLOSE_TIMEOUT_S),
                         return_exceptions=True)


class _Ending(Exception):
    """Raised inside a pump to end the session as ``end`` says."""

    def __init__(self, end: End) -> None:
        super().__init__(end.by)
        self.end = end


def _model_value(named: frames.Named) -> str:
    """The alias a client event names; a model that is not a string is refused as the audio
    routes refuse one."""
    if named.absent:
        # The provider would transcribe with a default model of its choosing: not an alias the
        # key was checked for, priced or limited by this gateway.
        raise Refused("missing_model", "Name the transcription model: a transcription configuration "
                      "without 'model' is not accepted here.")
    if named.value is None:
        raise Refused("missing_model", "The model must be a string.")
    return named.value


def _refusal(status: int, headers: Mapping[str, str] | None) -> errors.GatewayError:
    """The caller's answer when the upstream refused the WebSocket handshake with ``status``;
    its ``Retry-After`` is passed on, as the audio routes relay an upstream's answer."""
    if status == 401:  # the provider refused the key the gateway holds, not the caller's
        return errors.upstream_auth_failed()
    retry = headers.get(hdrs.RETRY_AFTER) if headers is not None else None
    return errors.GatewayError(status if 400 <= status < 600 else 502, "upstream_error", "upstream_error",
                               f"The upstream provider refused the session (HTTP {status}).",
                               headers={hdrs.RETRY_AFTER: retry} if retry else None)

