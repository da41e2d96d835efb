"""What changes while the app runs: the resources in force (a reload swaps them) and the drain."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .config import Resources


@dataclass(slots=True)
class Live:
    """A request reads ``resources`` once and keeps that snapshot, so a reload never changes the
    rules of a request in flight."""

    resources: Resources
    draining: bool = False
    in_flight: int = 0                      # audio exchanges under way
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set when in_flight drops to 0

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self.idle.set()
