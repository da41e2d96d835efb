"""The one timer of a request, moved forward as bytes flow, remembering who it waits on.

A request has one deadline. Moving a timer per chunk would cancel and push a timer handle every
time (it showed as 8% of a speech request's time under load), so ``wait`` only records the new
deadline; one check timer fires at the earliest deadline ever set and re-arms itself for the
current one when bytes have flowed since. When it really expires, ``waiting_on`` tells a silent
caller (408 ``client_timeout``) from a silent upstream (504).

Expiry works as ``asyncio.timeout`` does (the request's task is cancelled, and the ``scope``
being left turns that cancellation into ``TimeoutError``), without its cost: ``asyncio.timeout``
looks up the running loop and the current task on entry, and each lookup of the running loop
is a ``getpid`` system call (2.5 % of the process under speech load, two scopes a request).
Scopes nest: the exchange has one, and each upstream attempt another, so that an attempt's
timeout is caught where failover can act on it; expiry ends the innermost one.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

CLIENT = "client"
UPSTREAM = "upstream"


class Deadline:
    __slots__ = ("_check", "_loop", "_scopes", "_task", "_when", "waiting_on")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task) -> None:
        """``task`` is the one to cancel on expiry: the request's own."""
        self._loop = loop
        self._task = task
        self._when = float("inf")
        self._check: asyncio.TimerHandle | None = None
        self._scopes: list[Scope] = []
        self.waiting_on = CLIENT

    def scope(self) -> Scope:
        """``with deadline.scope():`` the code an expiry ends with TimeoutError."""
        return Scope(self)

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
        if self._loop.time() < self._when:  # bytes flowed since this was set: look again later
            self._check = self._loop.call_at(self._when, self._fire)
            return
        self._check = None
        if self._scopes and not self._scopes[-1].expired:
            self._scopes[-1].expired = True
            self._task.cancel()

    def close(self) -> None:
        if self._check is not None:
            self._check.cancel()
            self._check = None


class Scope:
    """Where an expiry of its deadline surfaces as TimeoutError (asyncio.timeout's rules: only the
    cancellation it caused becomes a timeout; one from elsewhere goes on as CancelledError)."""

    __slots__ = ("_cancelling", "_deadline", "expired")

    def __init__(self, deadline: Deadline) -> None:
        self._deadline = deadline
        self.expired = False
        self._cancelling = 0

    def __enter__(self) -> Scope:
        self._cancelling = self._deadline._task.cancelling()
        self._deadline._scopes.append(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        deadline = self._deadline
        deadline._scopes.remove(self)
        if self.expired and deadline._task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
            raise TimeoutError from exc
