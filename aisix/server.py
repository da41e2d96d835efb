"""The process: listeners, signals, reload and drain around the app create_app builds.

SIGHUP reloads resources.yaml (all or nothing); SIGTERM and SIGINT drain (``/readyz`` 503 at
once, in-flight requests finish up to the drain deadline, the usage queue is flushed) and exit 0.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
from collections.abc import Callable

import uvloop
from aiohttp import web

from . import logs, sdnotify
from .access_log import AccessLogger, Writer
from .app import create_app
from .config import Config, ConfigError, Listen, load_resources
from .connection import AppRunner
from .keys import LIVE, METRICS, POOL, SETTINGS, USAGE
from .live import Live
from .metrics import metrics_app

log = logging.getLogger(__name__)

SESSION_CLOSE_S = 5.0  # at the drain deadline, how long realtime sessions get to close


def reload_resources(app: web.Application) -> bool:
    """Swap in a new resources.yaml if it validates whole; otherwise keep serving the old one."""
    path = app[SETTINGS].resources_file
    try:
        resources = load_resources(path, os.environ)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused, keeping the previous resources: %s", problem)
        return False
    app[LIVE].resources = resources
    app[POOL].forget_targets()
    app[METRICS].reconfigured(resources.models)
    app[USAGE].reopen()  # logrotate moved the usage file away, most likely
    log.info("reloaded %s: %d models, %d api keys, %d guardrails", path, len(resources.models),
             len(resources.api_keys), len(resources.guardrails))
    return True


def serve(config: Config, access_log: bool = True, reload_asked: Callable[[], bool] = lambda: False) -> int:
    """Run the gateway until SIGTERM or SIGINT; the exit code. ``reload_asked``: whether a SIGHUP
    came before its handler was installed (the reload is then done at once)."""
    logs.setup()
    _steady_malloc()
    try:
        # uvloop: the event loop and transports in C; the proxy's per-request cost is mostly loop
        # and socket work, which it cuts by about a third.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(config, access_log, reload_asked))
    except (OSError, ValueError) as exc:  # a port in use, a usage sink that cannot be opened
        log.error("cannot start: %s", exc)
        return 1
    return 0


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _steady_malloc() -> None:
    """Fixed glibc malloc thresholds instead of its adaptive ones.

    Body chunks are up to 256 KiB. With the defaults, glibc serves blocks that size from mmap
    or gives the top of the heap back to the kernel after a burst, then takes it again: under a
    steady upload load that was 4 to 20 page faults per request (bench, 256 KiB transcriptions)
    and up to a fifth of the gateway's CPU, coming and going as glibc re-tuned itself. Blocks
    under 4 MiB now always come from the heap, and the heap is trimmed only when 64 MiB of it is
    free at its top: what a process holds after a burst is what it will need for the next one.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 4 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators, as they are
        pass


# The backstop to the rare automatic collections: young objects every GC_EVERY_S, everything not
# frozen every GC_FULL_EVERY of those. Measured under wrk (256 KiB uploads, 1,100 req/s): a young
# collection took 1.6 ms (3.2 at most), a full one 5.5 ms: about 0.2 % of the process's time.
GC_EVERY_S = 1.0
GC_FULL_EVERY = 60


class Collector:
    """Collects cyclic garbage on a timer, whatever the allocation counts say.

    With _steady_gc's thresholds, and requests freeing what they allocate, the automatic
    collections hardly ever run under steady load: a reference cycle that holds an upload's
    buffers or a connection (each known one is broken by hand, and tests/test_memory.py checks
    that no request leaves one) would be kept until one did. This bounds how long: a second for
    young garbage, a minute for garbage that aged before it became garbage.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, every_s: float = GC_EVERY_S,
                 full_every: int = GC_FULL_EVERY) -> None:
        self._loop, self._every_s, self._full_every = loop, every_s, full_every
        self._runs = 0
        self._timer = loop.call_later(every_s, self._run)

    def _run(self) -> None:
        self._runs += 1
        gc.collect(2 if self._runs % self._full_every == 0 else 1)
        self._timer = self._loop.call_later(self._every_s, self._run)

    def stop(self) -> None:
        self._timer.cancel()


def _steady_gc() -> None:
    """What the process holds once started (modules, config, the app) is moved out of the
    collector's sight, and young objects are collected less often.

    A request allocates a few hundred objects (a task, futures, the exchange, headers, the
    usage event) and frees them by reference counting, with few cycles. At the default
    threshold (700) the collector ran every couple of requests and, every tenth or hundredth
    run, walked every object the process holds: the modules, aiohttp's and the config's.
    Collector bounds how long a cycle can wait for a collection at these thresholds.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


async def _serve(config: Config, access_log: bool, reload_asked: Callable[[], bool]) -> None:
    settings = config.settings
    app = create_app(config)
    lines = Writer()
    runner = AppRunner(  # aiohttp's, answering what its HTTP parser refuses with an envelope
        app,
        handler_cancellation=True,  # a caller that leaves also ends the upstream call it waits on
        # Bodies as sent: a decoded body would not match the length the caller declared, and a
        # decompressor run on a stranger's bytes is a bomb waiting. Coded bodies are refused.
        auto_decompress=False,
        access_log_class=AccessLogger.configured(settings.access_log_probes, lines),
        access_log=logging.getLogger("aisix.access") if access_log else None,
        shutdown_timeout=1.0,  # the drain below already waited for the requests that matter
        # aiohttp's default is an hour, and the same timer is the only bound on a header phase.
        keepalive_timeout=settings.proxy.keepalive_timeout_ms / 1000,
    )
    await runner.setup()
    _steady_gc()
    collector = Collector(asyncio.get_running_loop())
    metrics_runner = None
    started = False
    try:
        if settings.metrics_listen is not None:
            # First, and never shared: an instance that was given another's metrics port fails
            # before it joins the proxy port, instead of answering half of someone else's scrapes.
            metrics_runner = web.AppRunner(metrics_app(app[METRICS]), access_log=None)
            await metrics_runner.setup()
            await _listen(metrics_runner, settings.metrics_listen, "metrics.listen", "aisix metrics listening on",
                          reuse_port=False)
        # reuse_port: several processes (one per core) serve one port; the kernel spreads
        # connections between them.
        site = await _listen(runner, settings.proxy.listen, "proxy.listen", "aisix listening on", reuse_port=True)
        started = True
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload_resources, app)
        if reload_asked():  # before the handler: what it asked for may be newer than what was read
            reload_resources(app)
        sdnotify.notify("READY=1")
        await stop.wait()
        sdnotify.notify("STOPPING=1")
        proxy = settings.proxy
        await _drain(app, site, proxy.drain_grace_ms / 1000, proxy.drain_timeout_ms / 1000)
    finally:
        collector.stop()
        await runner.cleanup()
        lines.flush()  # before "aisix stopped": the drained requests' lines come first
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        if started:  # else serve() says why it could not start, last
            log.info("aisix stopped")


async def _listen(runner: web.AppRunner, listen: Listen, field: str, what: str, reuse_port: bool) -> web.TCPSite:
    site = web.TCPSite(runner, listen.host, listen.port, reuse_port=reuse_port)
    try:
        await site.start()
    except OSError as exc:  # a host that does not resolve or is not this machine's, a port in use
        raise OSError(f"{field} {listen.host}:{listen.port}: {exc.strerror or exc}") from None
    for address in runner.addresses:  # the real port when 0 was asked for
        host, port = address[:2]
        log.info("%s http://%s:%d", what, host, port)
    return site


async def _drain(app: web.Application, site: web.TCPSite, grace: float, deadline: float) -> None:
    """/readyz 503 at once; the listener stays up while busy for ``grace``, then closes; what is
    in flight gets ``deadline`` in all."""
    live = app[LIVE]
    live.draining = True
    log.info("draining: /readyz answers 503, %d requests in flight, up to %.0f s", live.in_flight, deadline)
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    if live.in_flight and not await _idle_within(live, min(grace, deadline)):
        await site.stop()  # new connections go to the other processes on the port, if any
        log.info("stopped accepting: %d requests in flight", live.in_flight)
    if live.in_flight and not await _idle_within(live, end - loop.time()):
        log.warning("drain deadline reached with %d requests in flight: closing them", live.in_flight)
        live.cutting = True  # their records say shutting_down, not that their callers left
        if live.sessions:
            # Realtime sessions are told why (1001, going away); their handlers then finish and
            # write their usage events, given the few seconds a close handshake takes.
            log.info("closing %d realtime sessions with 1001", len(live.sessions))
            for session in list(live.sessions):
                session.end(1001)
            await _idle_within(live, SESSION_CLOSE_S)
    if live.in_flight:
        log.info("drain over: cutting %d requests", live.in_flight)
    else:
        log.info("drained")


async def _idle_within(live: Live, seconds: float) -> bool:
    try:
        await asyncio.wait_for(live.idle.wait(), max(seconds, 0))
    except TimeoutError:
        return False
    return True
