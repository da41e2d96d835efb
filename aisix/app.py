"""create_app(config): the routes on one screen, the app's state, and what lives as long as the app
(``cleanup_ctx``, in order). Running it as a process is server.py's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from . import endpoints, forms, inbound, pipeline, realtime, responses, speech, upstream
from .config import Config
from .keys import CLOCK, LIMITER, LIVE, METRICS, POOL, SETTINGS, USAGE
from .limits import Limiter
from .live import Live
from .metrics import Metrics
from .usage import UsageSink

log = logging.getLogger(__name__)


def create_app(config: Config, clock: Callable[[], float] = time.time) -> web.Application:
    # client_max_size does not cover streamed reads: the pipeline counts body bytes itself.
    app = web.Application()
    app[SETTINGS] = config.settings
    app[LIVE] = Live(config.resources)
    app[CLOCK] = clock
    spill = config.settings.usage_spill_dir
    sink = app[USAGE] = UsageSink.create(config.settings.usage_sink, spill_dir=str(spill) if spill else None)
    limiter = app[LIMITER] = Limiter.create(config.settings.ratelimit_backend)
    app[METRICS] = Metrics({
        "aisix_usage_events_dropped": ("Usage events dropped (queue full or write failed).",
                                       lambda: sink.dropped_total),
        "aisix_usage_events_written": ("Usage events written to the sink.", lambda: sink.written_so_far),
        "aisix_usage_events_spilled": ("Usage events kept on local disk while the sink could not take them.",
                                       lambda: sink.spilled_total),
        "aisix_ratelimit_fail_open": ("Admissions let through because the limit store failed.",
                                      lambda: limiter.fail_open_total),
        "aisix_ratelimit_settle_errors": ("Slot releases or token charges the limit store lost.",
                                          lambda: limiter.settle_errors_total),
    })
    # Cleanup runs in reverse: the upstream pool closes first, then the limiter, then the usage
    # queue is flushed, so the last events (those of the drained requests) are written.
    app.cleanup_ctx.append(_usage_sink)
    app.cleanup_ctx.append(_limiter)
    app.cleanup_ctx.append(_upstream_pool)
    app.cleanup_ctx.append(realtime.client)

    routes = [("POST", "/v1/audio/speech", pipeline.route("speech", speech.read)),
              ("POST", "/v1/audio/transcriptions", pipeline.route("transcriptions", forms.read)),
              ("POST", "/v1/audio/translations", pipeline.route("translations", forms.read)),
              ("GET", "/v1/realtime", realtime.session),
              ("GET", "/v1/models", endpoints.models),
              ("GET", "/v1/models/{alias:.+}", endpoints.model),  # aliases may hold a "/"
              ("GET", "/livez", endpoints.livez),
              ("GET", "/readyz", endpoints.readyz)]
    methods: dict[str, tuple[str, ...]] = {}
    # expect_handler: a 100 Continue only once the pipeline has decided to read the body (inbound.py).
    for method, path, handler in routes:
        if method == "GET":
            app.router.add_get(path, responses.route(handler), expect_handler=inbound.expect)  # and HEAD
            methods[path] = ("GET", "HEAD")
        else:
            app.router.add_route(method, path, responses.route(handler), expect_handler=inbound.expect)
            methods[path] = (method,)
    cors = config.settings.proxy.cors
    for path, allowed in methods.items():
        if cors is not None and path.startswith("/v1/"):  # browsers' preflights; else OPTIONS is 405
            app.router.add_route("OPTIONS", path, responses.preflight(allowed, cors))
    # last: 404 and 405; [\s\S], not '.': a path with a decoded newline (/v1/models%0a) got
    # aiohttp's own plain-text 404 (its version in Server, no request id, no envelope)
    app.router.add_route("*", "/{path:[\\s\\S]*}", responses.unrouted(methods), expect_handler=inbound.expect)
    return app


async def _usage_sink(app: web.Application) -> AsyncIterator[None]:
    sink = app[USAGE]
    await sink.start()
    yield
    await sink.close()
    # Spilled: went to the spill on their way (those replayed since are among the written; what is
    # left there for the next start was warned of as the sink closed).
    log.info("usage events: %d written, %d spilled, %d dropped", sink.written_total, sink.spilled_total,
             sink.dropped_total)


async def _limiter(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[LIMITER].close()


async def _upstream_pool(app: web.Application) -> AsyncIterator[None]:
    pool = app[POOL] = upstream.Pool(app[SETTINGS].upstream)
    yield
    await pool.close()
