"""Usage events: the event of one exchange, and the sink that takes them off the request path (one
bounded queue, one writer); what is not written is counted.

``emit`` only appends to a queue (event loop thread only); one writer task drains whatever is
queued into one batch, encodes it with orjson and writes it in one go: a file (JSON lines,
reopened after rotation), stdout, or a Redis stream. When the queue is full, a write fails or
``close`` runs out of time, the events are dropped and counted in ``dropped_total``: never lost
silently, never re-queued (a batch cut off mid-write counts as dropped even if part of it
landed). The sink owns an event dict once emitted: it is encoded later, in the writer. File and
stdout writes are synchronous in the writer task (page cache; a stdout pipe nobody reads would
stall the loop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import deque
from typing import IO, TYPE_CHECKING, Any

import orjson

from .exchange import Exchange
from .specs import SinkSpec

if TYPE_CHECKING:  # imported when a Redis sink starts: stdout and file sinks never need redis-py
    import redis.asyncio as aioredis

log = logging.getLogger(__name__)

_WARN_EVERY_S = 10.0


def event(ex: Exchange) -> dict[str, Any]:
    """The usage event (docs/api.md, "Usage events"): fields that are unknown are absent, never
    guessed."""
    out: dict[str, Any] = {
        "ts": rfc3339(ex.ts),
        "request_id": ex.request_id,
        "route": ex.route,
        "api_key": ex.api_key,
        "status": ex.status,
        "error_code": ex.error_code,
        "latency_ms": ex.latency_ms,
        "bytes_in": ex.bytes_in,
        "bytes_out": ex.bytes_out,
        "stream": ex.stream,
    }
    fields: tuple[tuple[str, object], ...] = (("model", ex.model), ("upstream_model", ex.upstream_model),
                        ("provider_key", ex.provider_key), ("upstream_ttfb_ms", ex.upstream_ttfb_ms),
                        ("close_code", ex.close_code))
    for name, value in fields:
        if value is not None:
            out[name] = value
    if ex.usage is not None:
        u = ex.usage
        reported: tuple[tuple[str, object], ...] = (
            ("input_tokens", u.input_tokens), ("output_tokens", u.output_tokens),
            ("total_tokens", u.total_tokens), ("audio_seconds", u.audio_seconds))
        for name, value in reported:
            if value is not None:
                out[name] = value
    if ex.verdict is not None:
        out["guardrail"] = ex.verdict.as_event()
    if ex.attempts:
        out["attempts"] = ex.attempts
    return out


_second: list[Any] = [None, ""]  # the last whole second formatted: most events share it


def rfc3339(ts: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. 2026-11-24T08:14:26.927Z."""
    micro = round(ts * 1_000_000)  # as datetime rounds a float timestamp
    second, ms = micro // 1_000_000, micro % 1_000_000 // 1000
    if _second[0] != second:
        _second[0], _second[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{ms:03d}Z"
_REDIS_TIMEOUT_S = 2.0


class UsageSink:
    """The queue and the writer; subclasses say where a batch of encoded lines goes."""

    def __init__(self, name: str, queue_size: int = 10000) -> None:
        self.name = name                    # for messages; never holds a secret
        self.dropped_total = 0
        self.written_total = 0
        self._queue: deque[dict] = deque()
        self._size = queue_size
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._warned_at = float("-inf")
        self._unwarned = 0

    @classmethod
    def create(cls, spec: SinkSpec, queue_size: int = 10000) -> UsageSink:
        if spec.kind == "file":
            return FileSink(spec.target, queue_size)
        if spec.kind == "redis":
            return RedisSink(spec, queue_size)
        return StdoutSink("stdout", queue_size)

    def emit(self, event: dict) -> None:
        if self._closing or len(self._queue) >= self._size:
            self.dropped_total += 1
            return
        self._queue.append(event)
        if not self._wake.is_set():
            self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"usage-writer {self.name}")

    async def close(self, timeout: float = 10.0) -> None:
        """Write everything queued, then stop; after ``timeout`` s the rest is counted as dropped."""
        await self.start()                  # a sink never started still writes what was emitted
        self._closing = True
        self._wake.set()
        assert self._task is not None
        _, pending = await asyncio.wait({self._task}, timeout=timeout)
        if pending:
            self._task.cancel()             # the writer counts the batch it was holding
            await asyncio.wait({self._task})
        if self._queue:
            self._lost(len(self._queue), "not written before close timed out")
            self._queue.clear()
        await self._release()

    def reopen(self) -> None:
        """File sink: start a new file at the path (SIGHUP after logrotate). Others: nothing."""

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(self._queue)
            self._queue.clear()
            lines = []
            for event in batch:
                try:
                    lines.append(orjson.dumps(event))
                except TypeError as exc:    # a caller's bug must not cost the rest of the batch
                    self._lost(1, f"event not encodable: {exc}")
            if not lines:
                continue
            try:
                await self._write(lines)
            except asyncio.CancelledError:
                self._lost(len(lines), "writer cancelled")
                raise
            except Exception as exc:
                self._lost(len(lines), f"{type(exc).__name__}: {exc}")
            else:
                self.written_total += len(lines)

    def _lost(self, n: int, why: str) -> None:
        """Count dropped events; say so at most once per 10 s (a dead backend fails every batch)."""
        self.dropped_total += n
        self._unwarned += n
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            log.warning("usage sink %s: %d events dropped (%d in all): %s",
                        self.name, self._unwarned, self.dropped_total, why)
            self._warned_at = now
            self._unwarned = 0

    async def _write(self, lines: list[bytes]) -> None:
        raise NotImplementedError

    async def _release(self) -> None:
        pass


class StdoutSink(UsageSink):
    async def _write(self, lines: list[bytes]) -> None:
        out = sys.stdout.buffer            # looked up per batch: stdout may have been replaced
        out.write(b"\n".join(lines) + b"\n")
        out.flush()


class FileSink(UsageSink):
    """Append-only JSON lines; a rotated or removed file is noticed by inode before each batch."""

    def __init__(self, path: str, queue_size: int = 10000) -> None:
        super().__init__(f"file:{path}", queue_size)
        if not path:
            raise ValueError("usage sink 'file:': no path given")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ValueError(f"usage sink {self.name!r}: directory {folder} does not exist")
        self.path = path
        self._file: IO[bytes] | None = None
        self._id: tuple[int, int] | None = None
        try:
            self._open()
        except OSError as exc:
            raise ValueError(f"usage sink {self.name!r}: cannot open: {exc.strerror}") from None

    def _open(self) -> None:
        self._file = open(self.path, "ab")
        st = os.fstat(self._file.fileno())
        self._id = (st.st_dev, st.st_ino)

    def _shut(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as exc:
                log.warning("usage sink %s: closing the old file: %s", self.name, exc)

    def reopen(self) -> None:
        self._shut()
        try:
            self._open()
        except OSError as exc:              # the next batch tries again, counting what it loses
            log.warning("usage sink %s: cannot reopen: %s", self.name, exc.strerror)

    async def _write(self, lines: list[bytes]) -> None:
        try:
            st = os.stat(self.path)
            moved = (st.st_dev, st.st_ino) != self._id
        except FileNotFoundError:
            moved = True
        if moved or self._file is None:     # as WatchedFileHandler: rotated away, start anew
            self._shut()
            self._open()
        assert self._file is not None
        self._file.write(b"\n".join(lines) + b"\n")
        self._file.flush()

    async def _release(self) -> None:
        self._shut()


class RedisSink(UsageSink):
    """``XADD stream MAXLEN ~ maxlen * data <json>``, one pipeline per batch."""

    def __init__(self, spec: SinkSpec, queue_size: int = 10000) -> None:
        super().__init__(spec.name, queue_size)
        self.stream = spec.stream
        self.maxlen = spec.maxlen
        self._url = spec.target
        self._redis: aioredis.Redis | None = None

    async def start(self) -> None:
        if self._redis is None:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # One immediate retry: the first command on a connection Redis dropped fails once.
            self._redis = aioredis.Redis.from_url(
                self._url, socket_timeout=_REDIS_TIMEOUT_S, socket_connect_timeout=_REDIS_TIMEOUT_S,
                retry=Retry(NoBackoff(), 1))
        await super().start()

    async def _write(self, lines: list[bytes]) -> None:
        assert self._redis is not None  # start() ran
        pipe = self._redis.pipeline(transaction=False)
        for line in lines:
            pipe.xadd(self.stream, {"data": line}, maxlen=self.maxlen, approximate=True)
        await pipe.execute()

    async def _release(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

