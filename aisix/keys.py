"""Every typed key of the app and of a request, and nothing else."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import ClientSession, web

from .config import Settings
from .exchange import Exchange
from .limits import Limiter
from .live import Live
from .metrics import Metrics
from .upstream import Pool
from .usage import UsageSink

SETTINGS = web.AppKey("settings", Settings)
LIVE = web.AppKey("live", Live)
POOL = web.AppKey("pool", Pool)
USAGE = web.AppKey("usage", UsageSink)
LIMITER = web.AppKey("limiter", Limiter)
METRICS = web.AppKey("metrics", Metrics)
WS_CLIENT = web.AppKey("ws_client", ClientSession)  # realtime sessions' upstream WebSockets
# The wall clock (Unix seconds) the limits, key expiry and usage events read: injectable, so a
# test can put a request where it wants in a rate-limit window.
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")

REQUEST_ID = web.RequestKey("request_id", str)
EXCHANGE = web.RequestKey("exchange", Exchange)
# The display name of the caller's key on a route that is not an exchange (GET /v1/models), for
# the access log; an exchange has it as api_key. Never the key itself.
CALLER = web.RequestKey("caller", str)
