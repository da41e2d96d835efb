"""create_app(config): the routes, the middleware, and what lives as long as the app; serve() runs it."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator

from aiohttp import web

from . import handlers, middlewares, upstream
from .config import Config
from .keys import LIMITER, LIVE, SESSION, SETTINGS, USAGE, Live
from .limits import Limiter
from .usage import UsageSink

log = logging.getLogger(__name__)


def create_app(config: Config) -> web.Application:
    # client_max_size does not cover streamed reads: the handlers count body bytes themselves.
    app = web.Application(middlewares=[middlewares.gateway])
    app[SETTINGS] = config.settings
    app[LIVE] = Live(config.resources)
    app[USAGE] = UsageSink.create(config.settings.usage_sink)
    app[LIMITER] = Limiter.create(config.settings.ratelimit_backend)
    # Cleanup runs in reverse: the session closes first, then the usage queue is flushed.
    app.cleanup_ctx.append(_usage_sink)
    app.cleanup_ctx.append(_limiter)
    app.cleanup_ctx.append(_upstream_session)
    app.on_response_prepare.append(middlewares.stamp_request_id)

    app.router.add_post("/v1/audio/speech", handlers.speech)
    app.router.add_post("/v1/audio/transcriptions", handlers.transcriptions)
    app.router.add_post("/v1/audio/translations", handlers.translations)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/livez", handlers.livez)
    app.router.add_get("/readyz", handlers.readyz)
    return app


async def _usage_sink(app: web.Application) -> AsyncIterator[None]:
    sink = app[USAGE]
    await sink.start()
    yield
    await sink.close()
    log.info("usage events: %d written, %d dropped", sink.written_total, sink.dropped_total)


async def _limiter(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[LIMITER].close()


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    session = upstream.create_session(app[SETTINGS].upstream)
    app[SESSION] = session
    yield
    await session.close()


def serve(config: Config, access_log: bool = True) -> int:
    """Run the gateway until SIGTERM or SIGINT; the exit code."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(_serve(config, access_log))
    except (OSError, ValueError) as exc:  # a port in use, a usage sink that cannot be opened
        log.error("cannot start: %s", exc)
        return 1
    return 0


async def _serve(config: Config, access_log: bool) -> None:
    listen = config.settings.proxy.listen
    runner = web.AppRunner(
        create_app(config),
        handler_cancellation=True,  # a caller that leaves also ends the upstream call it waits on
        access_log=logging.getLogger("aisix.access") if access_log else None,
    )
    await runner.setup()
    site = web.TCPSite(runner, listen.host, listen.port, reuse_port=True)
    await site.start()
    for sock in site._server.sockets if site._server else ():  # the real port when 0 was asked for
        host, port = sock.getsockname()[:2]
        log.info("aisix listening on http://%s:%d", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("aisix stopping")
        await runner.cleanup()
