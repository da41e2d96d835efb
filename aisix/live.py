"""What changes while the app runs: the resources in force (a reload swaps them) and the drain."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from .config import Resources


class Session(Protocol):
    """An open realtime session, as the drain sees it."""

    def end(self, code: int) -> None:
        """Close both sides with ``code`` (the session's handler does it and then finishes)."""


@dataclass(slots=True)
class Live:
    """A request reads ``resources`` once and keeps that snapshot, so a reload never changes the
    rules of a request in flight."""

    resources: Resources
    draining: bool = False
    cutting: bool = False                   # the drain's deadline passed: what still runs is being cut
    in_flight: int = 0                      # audio exchanges and realtime sessions under way
    sessions: set[Session] = field(default_factory=set)  # the realtime sessions open
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set when in_flight drops to 0

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self.idle.set()
