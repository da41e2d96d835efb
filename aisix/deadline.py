"""The one timer of a request, moved forward as bytes flow, remembering who it waits on.

A single ``asyncio.timeout`` spans the whole exchange. Moving it per chunk would cancel and push
a timer handle every time (it showed as 8% of a speech request's time under load), so ``wait``
only records the new deadline; one check timer fires at the earliest deadline ever set and
re-arms itself for the current one when bytes have flowed since. When it really expires,
``waiting_on`` tells a silent caller (408 ``client_timeout``) from a silent upstream (504).
"""

from __future__ import annotations

import asyncio

CLIENT = "client"
UPSTREAM = "upstream"


class Deadline:
    __slots__ = ("_timer", "_loop", "_when", "_check", "waiting_on")

    def __init__(self, timer: asyncio.Timeout) -> None:
        self._timer = timer
        self._loop = asyncio.get_running_loop()
        self._when = float("inf")
        self._check: asyncio.TimerHandle | None = None
        self.waiting_on = CLIENT

    def wait(self, seconds: float, on: str) -> None:
        """From now, allow ``seconds`` of waiting on ``on`` (CLIENT or UPSTREAM)."""
        when = self._when = self._loop.time() + seconds
        self.waiting_on = on
        check = self._check
        if check is None or check.when() > when:  # only an earlier deadline needs a new timer
            if check is not None:
                check.cancel()
            self._check = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        if self._loop.time() >= self._when:
            self._check = None
            self._timer.reschedule(self._loop.time())  # expire the exchange's timeout now
        else:  # bytes flowed since this was set: look again at the current deadline
            self._check = self._loop.call_at(self._when, self._fire)

    def swap(self, timer: asyncio.Timeout) -> asyncio.Timeout:
        """Expire ``timer`` instead from now on (an attempt's own, which routing can catch and
        fail over from); returns the one it replaces."""
        old, self._timer = self._timer, timer
        return old

    def close(self) -> None:
        if self._check is not None:
            self._check.cancel()
            self._check = None
