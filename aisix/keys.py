"""Every typed key of the app and of a request, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import ClientSession, web

from .config import Resources, Settings
from .limits import Limiter
from .usage import UsageSink


@dataclass(slots=True)
class Live:
    """What a reload may swap. A request reads ``resources`` once and keeps that snapshot."""

    resources: Resources


SETTINGS = web.AppKey("settings", Settings)
LIVE = web.AppKey("live", Live)
SESSION = web.AppKey("session", ClientSession)
USAGE = web.AppKey("usage", UsageSink)
LIMITER = web.AppKey("limiter", Limiter)

REQUEST_ID = web.RequestKey("request_id", str)
