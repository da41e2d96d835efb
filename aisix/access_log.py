"""One access-log line per request: client, request line, status, request id, caller key name,
alias, latency, body bytes and the upstream attempts (docs/operations.md, "Logs").

Never a key, a prompt, a query string or a header value other than the request id. aiohttp writes
the line once the answer is written; a handler cancelled because its caller left is never handed
back to aiohttp, so ``cancelled`` writes that request's one line instead. The probes (``/livez``,
``/readyz``) get none unless ``access_log.probes`` is set; ``--access-log off`` removes the log
entirely (load tests).

Lines are built once, as one string, and written by a buffered ``Writer``: one ``write`` per
64 KiB of lines, at most a second after the first of them, and at once on a drain and at exit.
A stdlib ``logging`` call per request cost a tenth of the process under load (a record, a
formatter, a handler lock and a write each); nginx's ``access_log ... buffer=64k flush=1s`` is
the same trade. The writes are made by the stderr thread (background.py), with the log's other
lines: a stderr nobody reads (a stalled journal) holds no request, and past the bytes that may
wait for it, lines are dropped and counted in a line written once it reads again.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import cast

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .background import STDERR, Background
from .keys import CALLER, EXCHANGE, REQUEST_ID

PROBES = frozenset(("/livez", "/readyz"))
_BARE = re.compile(r"[!#-~]+")  # printable ASCII but space and '"': written as is, else quoted
_LEFT = web.Response(status=499)  # the answer of a caller that left before it had one; never sent
_CUT = web.Response(status=503)  # of a request the drain's deadline cut before its answer; never sent


class Writer:
    """Access lines, buffered, to stderr (the journal under systemd) or another ``Background``."""

    LIMIT = 64 * 1024  # characters waiting that make a write at once
    INTERVAL = 1.0     # seconds a line may wait at most
    def __init__(self, out: Background | None = None) -> None:
        self.out = out if out is not None else STDERR
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def stamp(self) -> str:
        """The time as the process's other log lines write it (logging's asctime: local time and
        milliseconds), the formatted second cached."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int((now - second) * 1000):03d}"

    def add(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.LIMIT:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.INTERVAL, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        lines = self._lines
        data = "".join(lines).encode("utf-8", "backslashreplace")
        self._size = 0
        # Dropped past its limit while stderr is not read; an error writing (stderr closed) loses
        # the lines, never a request.
        self.out.offer(data, len(lines))
        lines.clear()

    def wait(self, timeout: float) -> bool:
        """Wait for what was flushed to be written, at most ``timeout`` s (a stop; tests)."""
        return self.out.wait(timeout)


class AccessLogger(AbstractAccessLogger):
    probes = False  # whether /livez and /readyz are logged; configured() sets it
    writer = Writer()

    @classmethod
    def configured(cls, probes: bool, writer: Writer) -> type[AccessLogger]:
        """The class aiohttp is given (it makes one instance per connection)."""
        return cast(type[AccessLogger], type(cls.__name__, (cls,), {"probes": probes, "writer": writer}))

    _peer: str | None = None  # this connection's client address (aiohttp makes an instance per connection)

    def _remote(self, request: web.BaseRequest) -> str | None:
        peer = self._peer
        if peer is None:
            peer = self._peer = request.remote
        return peer

    @property
    def enabled(self) -> bool:
        return True  # aiohttp makes no instance at all under --access-log off

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = request.rel_url.raw_path  # as sent: a decoded %0A would start a line of its own
        if '"' in path or "\\" in path:  # kept in its field: neither may end or escape the quotes
            path = path.replace("\\", "%5C").replace('"', "%22")
        if not self.probes and path in PROBES:
            return
        ex = request.get(EXCHANGE)
        attempts = None
        rid = ex.request_id if ex is not None else request.get(REQUEST_ID)
        if ex is not None:
            status, key, model, bytes_in, bytes_out = (
                ex.status or response.status, ex.api_key, ex.model, ex.bytes_in, ex.bytes_out)
            if ex.attempts:  # provider key and status (or how it failed) of each, in order
                attempts = ",".join(f"{a['provider_key']}:{a['status'] or a['error'] or 'aborted'}"
                                    for a in ex.attempts)
        else:
            status, key, model, bytes_in = response.status, request.get(CALLER), None, 0
            # Body bytes, as on the audio routes: aiohttp's body_length counts the headers too.
            bytes_out = 0 if request.method == "HEAD" else response.content_length or 0
        writer = self.writer
        writer.add(f'{writer.stamp()} INFO aisix.access: {self._remote(request)} "{request.method} {path}" {status} '
                   f"rid={_field(rid)} key={_field(key)} model={_field(model)} "
                   f"latency_ms={int(time * 1000)} bytes_in={bytes_in} bytes_out={bytes_out} "
                   f"attempts={_field(attempts)}\n")


def cancelled(request: web.BaseRequest, elapsed: float) -> None:
    """The line of a request whose handler was cancelled (its caller left): aiohttp writes none."""
    logger = request.protocol.access_logger
    if logger is None:  # --access-log off
        return
    ex = request.get(EXCHANGE)
    if ex is not None:
        cut = ex.error_code == "shutting_down"
        logger.log(request, ex.response or (_CUT if cut else _LEFT), ex.latency_ms / 1000)  # as its usage event
        # The response holds the request, which holds the exchange: aiohttp lets go of an
        # answered request's response, not of this one, and the cycle would wait for the rare
        # full collection (server._steady_gc).
        ex.response = None
    else:
        logger.log(request, _LEFT, elapsed)


def _field(value: str | None) -> str:
    """A value for key=value: "-" when absent, JSON-quoted unless it is one plain word. The alias
    is the caller's own string; unquoted, a newline in it would forge a log line."""
    if not value:
        return "-"
    return value if _BARE.fullmatch(value) else json.dumps(value)
