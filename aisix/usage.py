"""Usage events: the event of one exchange, and the sink that takes them off the request path (one
bounded queue, one writer); none is lost while there is disk to keep it on.

``emit`` only appends to a queue (event loop thread only); one writer task drains whatever is
queued into one batch (letting events gather for ``LINGER_S`` first, so a busy gateway makes one
write per few ms rather than one per request), encodes it with orjson and writes it in one go: a file (JSON lines,
reopened after rotation), stdout, or a Redis stream. When a write fails, the batch goes to the
spill (spill.py: a local append-only file) and so does every later batch while the spill holds
anything, so the order is kept; the writer replays the spill to the sink, oldest first, as soon
as the sink takes a write again (tried at least every ``RETRY_S``), and at ``close``. Events
are dropped, counted in ``dropped_total`` and logged only when the spill cannot take them (a full
disk, or ``usage.spill_dir: null``), when the queue is full, or when ``close`` runs out of time.
A Redis sink writes each event with a marker keyed by the event's hash, so an event replayed
after a write that half-landed reaches the stream once. The sink owns an event dict once
emitted: it is encoded later, in the writer. File and stdout writes are synchronous in the
writer task (page cache); stdout from a thread (usage_sinks.StdoutSink: a stdout nobody reads must not
stall the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson

from .exchange import Exchange, new_id
from .specs import SinkSpec
from .spill import Spill

log = logging.getLogger(__name__)

_WARN_EVERY_S = 10.0


def event(ex: Exchange) -> dict[str, Any]:
    """The usage event (docs/api.md, "Usage events"): fields that are unknown are absent, never
    guessed."""
    out: dict[str, Any] = {
        "ts": rfc3339(ex.ts),
        "event_id": new_id(),  # a request_id can repeat (a caller may send its own); this never does
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
    measured: tuple[tuple[str, object], ...] = (
        ("input_characters", ex.input_characters), ("audio_seconds_in", ex.audio_seconds_in),
        ("audio_seconds_out", ex.audio_seconds_out), ("cost_usd", ex.cost_usd))
    for name, value in measured:
        if value is not None:
            out[name] = round(value, 3) if name.startswith("audio_") else value  # type: ignore[call-overload]
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
RETRY_S = 1.0  # while events wait in the spill, how often the sink is tried again
ADOPT_S = 60.0  # how often a running sink looks for spill files a stopped process left
LINGER_S = 0.005  # how long the writer lets events gather before a batch, unless LINGER_EVENTS wait
LINGER_EVENTS = 256


class UsageSink:
    """The queue and the writer; subclasses say where a batch of encoded lines goes."""

    def __init__(self, name: str, queue_size: int = 10000) -> None:
        self.spill: Spill | None = None     # set by create() unless spilling is off
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
        self.adopt_every_s = ADOPT_S
        self._adopt_at = 0.0  # monotonic: when to look for other processes' spill files next
        self._replaying: Path | None = None  # the spill file of the batch being written, if replayed
        self._taken_from: Path | None = None  # _unconfirmed(): the spill file those lines came from
        self._replay_error = ""  # why the last replay of the spill failed, until one succeeds

    @classmethod
    def create(cls, spec: SinkSpec, queue_size: int = 10000, spill_dir: str | None = None) -> UsageSink:
        from .usage_sinks import FileSink, RedisSink, StdoutSink  # they build on this class

        sink: UsageSink
        if spec.kind == "file":
            sink = FileSink(spec.target, queue_size)
        elif spec.kind == "redis":
            sink = RedisSink(spec, queue_size)
        else:
            sink = StdoutSink("stdout", queue_size)
        sink.spill = Spill(spill_dir) if spill_dir else None
        return sink

    @property
    def spilled_total(self) -> int:
        return self.spill.spilled_total if self.spill is not None else 0

    @property
    def written_so_far(self) -> int:
        """What aisix_usage_events_written shows: written_total less what is counted ahead of a
        write that may yet fail and be taken back. A counter must never go down (Prometheus
        takes a decrease for a restart and counts it all again)."""
        return self.written_total

    def emit(self, event: dict) -> None:
        if self._closing or len(self._queue) >= self._size:
            self.dropped_total += 1
            return
        self._queue.append(event)
        if not self._wake.is_set():
            self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            if self.spill is not None:
                try:
                    self.spill.open()  # what a stopped process left is replayed first
                except OSError as exc:
                    log.error("usage sink %s: spill directory %s unusable, events the sink cannot take "
                              "will be dropped: %s", self.name, self.spill.dir, exc.strerror or exc)
                    self.spill = None
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
        # Handed to a writer that never finished: kept for the next start.
        unconfirmed = self._unconfirmed()
        if unconfirmed and (self.spill is None or not self.spill.append_first(unconfirmed, self._taken_from)):
            self._lost(len(unconfirmed), "still being written at stop")
        if self.spill is not None:
            if self.spill.pending:
                log.warning("usage sink %s: events left in the spill at %s, replayed at the next start",
                            self.name, self.spill.dir)
            self.spill.close()
        await self._release()

    def reopen(self) -> None:
        """File sink: start a new file at the path (SIGHUP after logrotate). Others: nothing."""

    async def _run(self) -> None:
        self._adopt_at = time.monotonic() + self.adopt_every_s  # start() has just looked
        while True:
            spill = self.spill
            if spill is not None and time.monotonic() >= self._adopt_at:
                self._adopt_at = time.monotonic() + self.adopt_every_s
                try:
                    spill.adopt()
                except OSError as exc:
                    log.warning("usage sink %s: cannot look in the spill directory: %s", self.name,
                                exc.strerror or exc)
            if spill is not None and spill.pending:
                await self._replay(spill)
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                if spill is not None:  # try the sink again before long; look for others' spills
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(RETRY_S if spill.pending else
                                                   max(0.0, self._adopt_at - time.monotonic())):
                            await self._wake.wait()
                else:
                    await self._wake.wait()
                continue
            if len(self._queue) < LINGER_EVENTS and not self._closing:
                # Under load a wake-up finds one or two events: a few ms more make one write of
                # many (a stat, a write and a flush per batch were a system call per request).
                await asyncio.sleep(LINGER_S)
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
            if spill is not None and spill.pending:  # behind what waits there: the order is kept
                self._keep(spill, lines, f"the sink is behind: {self._replay_error}" if self._replay_error
                           else "the sink is behind")
                continue
            try:
                await self._write(lines)
            except asyncio.CancelledError:
                if spill is None or not spill.append(lines):
                    self._lost(len(lines), "writer cancelled")
                raise
            except Exception as exc:
                if spill is None:
                    self._lost(len(lines), f"{type(exc).__name__}: {exc}")
                else:
                    self._keep(spill, lines, f"{type(exc).__name__}: {exc}")
            else:
                self.written_total += len(lines)

    def _keep(self, spill: Spill, lines: list[bytes], why: str) -> None:
        if not spill.append(lines):
            self._lost(len(lines), "the spill could not take them (disk full?)")
            return
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            log.warning("usage sink %s: %d events kept in the spill (%s); replayed when the sink is back",
                        self.name, spill.spilled_total, why)
            self._warned_at = now

    async def _replay(self, spill: Spill) -> None:
        """Send what the spill holds, oldest first, until it is empty or the sink fails again."""
        replayed = 0
        while lines := spill.batch():
            self._replaying = spill.reading
            try:
                await self._write(lines)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (still down: the spill keeps them, tried again later)
                # Said at most every 10 s, as _keep does: the only word of why the sink fails
                # while events wait in the spill (a restart finds one; later batches go behind it).
                self._replay_error = f"{type(exc).__name__}: {exc}"
                now = time.monotonic()
                if now - self._warned_at >= _WARN_EVERY_S:
                    log.warning("usage sink %s: cannot send the spill yet (%s); tried again every %.0f s",
                                self.name, self._replay_error, RETRY_S)
                    self._warned_at = now
                return
            finally:
                self._replaying = None
            self._replay_error = ""
            spill.done()
            self.written_total += len(lines)
            replayed += len(lines)
        if replayed:
            log.info("usage sink %s: %d events replayed from the spill", self.name, replayed)

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

    def _unconfirmed(self) -> list[bytes]:
        """At close: lines counted as written whose write has not ended (no longer counted)."""
        return []

    async def _release(self) -> None:
        pass
