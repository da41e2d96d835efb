"""Every typed key of the app and of a request, and nothing else."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from .config import Resources, Settings
from .exchange import Exchange
from .limits import Limiter
from .metrics import Metrics
from .upstream import Pool
from .usage import UsageSink


@dataclass(slots=True)
class Live:
    """What changes while the app runs. A request reads ``resources`` once and keeps that
    snapshot, so a reload never changes the rules of a request in flight."""

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


SETTINGS = web.AppKey("settings", Settings)
LIVE = web.AppKey("live", Live)
UPSTREAM = web.AppKey("upstream", Pool)
USAGE = web.AppKey("usage", UsageSink)
LIMITER = web.AppKey("limiter", Limiter)
METRICS = web.AppKey("metrics", Metrics)

REQUEST_ID = web.RequestKey("request_id", str)
EXCHANGE = web.RequestKey("exchange", Exchange)
