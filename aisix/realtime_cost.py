"""What a realtime session costs, as the upstream reports its usage.

[core] Pure: reported usage in, dollars out; no sockets, no clock. realtime.py feeds it each
report and charges the budgets what ``since()`` says; the session's ``cost_usd`` is ``total``.

A session is one request: ``per_request`` counts once. The session model's prices (its target's,
else its own) price its responses and the transcriptions of its own model; a transcription alias
of another model, named in ``session.update``, prices the transcriptions reported while it is
named, each when reported (a later alias does not re-price them), without its ``per_request``.
The Realtime API reports what it bills, with each response and transcription: a quantity a session
never reported, it did not use, so a priced session's cost is always known.
"""

from __future__ import annotations

import dataclasses

from . import pricing
from .config import Pricing
from .realtime_frames import add
from .transcript import Usage

_OWN = object()  # transcriptions are the session model's own


class Tally:
    __slots__ = ("_charged", "_others", "_others_charged", "_own", "_spent", "_transcriber", "total")

    def __init__(self) -> None:
        self._own: Pricing | None = None  # the session model's prices, once its target is known
        self._spent: Usage | None = None  # usage priced at them
        self._transcriber: object = _OWN  # the prices of another transcription model (None: unpriced)
        self._others = 0.0  # what that model's transcriptions cost, priced as they were reported
        self._charged = 0.0  # what since() and since_others() have handed out: what the budgets were charged
        self._others_charged = 0.0  # how much of _others has been handed out
        self.total: float | None = None  # the session's cost_usd; None while it is unpriced

    def priced_by(self, prices: Pricing | None) -> None:
        """The session model's prices, once its upstream is open."""
        self._own = prices

    def transcribed_by(self, prices: Pricing | None, own: bool) -> None:
        """The transcription model a session.update named: the session's own (``own``), or
        another with these prices (None: unpriced)."""
        self._transcriber = _OWN if own else (
            dataclasses.replace(prices, per_request=None) if prices is not None else None)

    def add(self, used: Usage, transcription: bool) -> None:
        """One report's usage: a response's, or (``transcription``) an input transcription's."""
        other = self._transcriber
        if not transcription or other is _OWN:
            self._spent = add(self._spent, used)
        elif isinstance(other, Pricing):
            self._others += _cost(other, used)

    def since(self) -> float | None:
        """What the session has cost since the last call (``total`` is then the whole); None
        while nothing it used is priced."""
        total = self._totalled()
        if total is None:
            return None
        # (rounded as total is: since_others() hands out sums of unrounded floats, and a float's
        # hair handed out here would be charged as a whole micro-dollar)
        since, self._charged = round(total - self._charged, 8), total
        self._others_charged = self._others
        return since

    def since_others(self) -> float:
        """What transcriptions by another model have cost since they were last handed out (they
        are charged to that model's windows, not the session model's); since() then leaves it out."""
        since, self._others_charged = self._others - self._others_charged, self._others
        self._charged += since
        self._totalled()
        return since

    def _totalled(self) -> float | None:
        """``total`` brought up to date; None while nothing the session used is priced."""
        own = _cost(self._own, self._spent) if self._own is not None else None
        if own is None and not self._others:
            return None
        self.total = round((own or 0.0) + self._others, 8)
        return self.total


def _cost(prices: Pricing, used: Usage | None) -> float:
    return pricing.cost(prices, pricing.Quantities(
        input_tokens=used.input_tokens or 0 if used is not None else 0,
        output_tokens=used.output_tokens or 0 if used is not None else 0,
        audio_seconds_in=used.audio_seconds or 0.0 if used is not None else 0.0)) or 0.0

