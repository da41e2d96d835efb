"""The one timer of a request, moved forward as bytes flow, remembering who it waits on.

A single ``asyncio.timeout`` spans the whole exchange; each phase reschedules it (idle gap while
bytes flow, the header wait once the request is sent). When it fires, ``waiting_on`` tells a
silent caller (408 ``client_timeout``) from a silent upstream (504 ``upstream_timeout``).
"""

from __future__ import annotations

import asyncio

CLIENT = "client"
UPSTREAM = "upstream"


class Deadline:
    __slots__ = ("_timer", "_loop", "waiting_on")

    def __init__(self, timer: asyncio.Timeout) -> None:
        self._timer = timer
        self._loop = asyncio.get_running_loop()
        self.waiting_on = CLIENT

    def wait(self, seconds: float, on: str) -> None:
        """From now, allow ``seconds`` of waiting on ``on`` (CLIENT or UPSTREAM)."""
        self._timer.reschedule(self._loop.time() + seconds)
        self.waiting_on = on
