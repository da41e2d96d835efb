"""What a realtime session owes: its slots on the limits, the usage the upstream reports charged as
it comes (priced by realtime_cost.Tally), the responses under way, and what a caller that left
mid-response still costs.

realtime.py's Session holds one Account: it sets the slots as it admits the session, hands each
server report here before relaying it, and at the end collects (``collect``) and settles
(``settle``). Nothing else in the session touches the limiter's charges.

Charges go where the usage was priced: a session's own usage to the key's and the session model's
windows (and the provider key's); the transcriptions of another transcription model, named in
``session.update``, to the key's windows and that model's own, never the session model's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

import aiohttp
from aiohttp import WSMsgType

from . import realtime_frames as frames
from .config import Model
from .exchange import Exchange
from .limits import Limiter, Slot
from .limits_plan import Limit
from .realtime_cost import Tally

COLLECT_S = 5.0  # what a caller that left mid-response is waited on for: its responses' cancel and done

_TEXT, _BINARY, _PING, _PONG = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.PING, WSMsgType.PONG


class Account:
    def __init__(self, ex: Exchange, limiter: Limiter, clock: Callable[[], float]) -> None:
        self.ex, self.limiter, self.clock = ex, limiter, clock
        self.slot: Slot | None = None  # key (and model) limits
        self.model_slot: Slot | None = None  # the transcription model's limits, when it is the session's
        self.provider_slot: Slot | None = None
        # A transcription model other than the session's, named in session.update: the one
        # named last (None: the session's own), and each one's slot on its own limits.
        self.transcriber: Model | None = None
        self.transcriber_slots: dict[str, Slot | None] = {}
        self.tally = Tally()  # what the reported usage costs
        # Responses the provider may be generating: ids created and not done, and the caller's
        # response.create events it has not answered with a response.created yet (collect()).
        self.responses: set[str] = set()
        self.asked = 0

    @property
    def under_way(self) -> bool:
        """Whether the provider may be generating a response."""
        return bool(self.responses or self.asked)

    async def admit_transcriber(self, model: Model) -> None:
        """Another transcription model than the session's is held to its own limits: admitted
        once per session when first named (its requests count the session once, a concurrency
        slot on it is held to the end), then charged the transcriptions it prices; raises
        RateLimited when its limits refuse."""
        if model.alias not in self.transcriber_slots:
            self.transcriber_slots[model.alias] = await self.limiter.admit_model(model, self.clock())

    async def account(self, report: frames.ServerReport) -> list[Limit]:
        """A server event's part in the session's responses and usage: usage charged now; the
        token, cost and audio windows of the key and model it took over their limit."""
        if report.created is not None:
            self.responses.add(report.created)
            self.asked = max(0, self.asked - 1)
        elif report.done is not None:
            if report.done in self.responses:
                self.responses.discard(report.done)
            elif self.asked:  # a response whose response.created went unseen
                self.asked -= 1
            elif len(self.responses) == 1:  # a done without the id its created had
                self.responses.clear()
        used = report.usage
        if used is None:
            return []
        self.ex.usage = frames.add(self.ex.usage, used)
        self.tally.add(used, report.transcription)
        other = self.transcriber if report.transcription else None
        if other is None:
            cost = self.cost_since()
        else:  # the key's windows and that model's, not the session model's
            cost = self.tally.since_others()
            self.ex.cost_usd = self.tally.total
        tokens, seconds = used.tokens, used.audio_seconds
        if not tokens and not cost and not seconds:
            return []
        now, charge = self.clock(), self.limiter.charge
        # All three start now and run on if the pump is cancelled: the tally's mark has moved.
        if other is None:
            first = charge(self.slot, tokens, now, cost, seconds)
            second = charge(self.model_slot, tokens, now, cost, seconds)
        else:
            first = charge(self.slot, tokens, now, cost, seconds, scope="key")
            second = charge(self.transcriber_slots[other.alias], tokens, now, cost, seconds)
        # The provider key's quota: not the caller's to hear about.
        over, more, _ = await asyncio.shield(asyncio.gather(
            first, second, charge(self.provider_slot, tokens, now, cost, seconds)))
        return over + more

    def cost_since(self) -> float | None:
        """What the session has cost since the budgets were last charged; its ``cost_usd`` is
        then the whole."""
        since = self.tally.since()
        if since is not None:
            self.ex.cost_usd = self.tally.total
        return since

    async def collect(self, upstream: aiohttp.ClientWebSocketResponse[Literal[False]] | None) -> None:
        """A caller that left while responses were under way: nobody will hear the rest, but the
        provider bills what it generated. Each is cancelled upstream (``response.cancel``) and its
        ``response.done`` read, unrelayed, for the usage to charge, for up to COLLECT_S in all. A
        response.create not answered yet is cancelled by a cancel without an id; an ``error``
        answer to that cancel (none in progress) ends the wait."""
        if upstream is None or upstream.closed or not self.under_way:
            return
        try:
            async with asyncio.timeout(COLLECT_S):  # the sends too: an upstream can stop reading
                await self._collected(upstream)
        except (ConnectionError, TimeoutError):
            return

    async def _collected(self, upstream: aiohttp.ClientWebSocketResponse[Literal[False]]) -> None:
        cancelled: set[str] = set()
        # The cancel of a response.create not answered yet: only the error that answers it (by its
        # event_id) says no response began. Another error answers another event, one the caller
        # may have sent to be refused just before its response.create.
        blank = frames.event_id()
        while True:
            for rid in self.responses - cancelled:
                await upstream.send_frame(frames.cancel_event(rid), _TEXT)
                cancelled.add(rid)
            if self.asked and not self.responses and "" not in cancelled:
                await upstream.send_frame(frames.cancel_event("", blank), _TEXT)
                cancelled.add("")
            if not self.under_way:
                return
            msg = await upstream.receive()
            if msg.type is _PING:
                await upstream.pong(msg.data)
            elif msg.type is _TEXT:
                report = frames.parse_server(msg.data)
                if report.answers == blank and not self.responses:
                    return  # the cancel of a response.create the provider refused, or never began
                await self.account(report)
            elif msg.type is not _BINARY and msg.type is not _PONG:
                return  # closed

    async def settle(self, priced: bool) -> None:
        """Every slot given back, charged what the session cost since its last report (when it
        reached an upstream, ``priced``: a session that never did costs nothing). Goes through a
        cancellation (Limiter.settle_all), raising it once all are settled."""
        now = self.clock()
        cost = self.cost_since() if priced else None
        try:
            await self.limiter.settle_all((self.slot, self.model_slot, self.provider_slot), None, now, cost or None)
        finally:  # (charged their transcriptions as reported)
            await self.limiter.settle_all(tuple(self.transcriber_slots.values()), None, now)
