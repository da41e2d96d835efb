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
writer task (page cache); stdout from a thread (StdoutSink: a stdout nobody reads must not
stall the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

import orjson

from .background import Background, Job
from .exchange import Exchange, new_id
from .specs import SinkSpec
from .spill import Spill

if TYPE_CHECKING:  # imported when a Redis sink starts: stdout and file sinks never need redis-py
    import redis.asyncio as aioredis

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
_REDIS_TIMEOUT_S = 2.0
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


class _Stalled(Exception):
    """stdout has not taken the last batch yet: this one waits in the spill."""


class StdoutSink(UsageSink):
    """JSON lines on stdout, written from a thread (background.py): a stdout nobody reads (a pipe
    whose reader stopped, a stalled journal) holds no request, probe or drain. A batch stdout has
    not taken within ``STALL_S`` is written, once, when it is read again; later batches wait in
    the spill meanwhile and are replayed after it, in order."""

    STALL_S = 1.0

    def __init__(self, name: str, queue_size: int = 10000) -> None:
        super().__init__(name, queue_size)
        self._out = Background("aisix-usage-stdout", _stdout, whole_lines=True)
        self._writing: asyncio.Future[None] | None = None  # a batch stdout has not taken yet
        self._writing_lines: list[bytes] = []
        self._job: Job | None = None  # its bytes, and how many of them stdout took
        self._job_from: Path | None = None  # the spill file it was replayed from, if it was

    async def _write(self, lines: list[bytes]) -> None:
        if not self._done_writing():
            raise _Stalled("stdout is not being read")
        writing = asyncio.get_running_loop().create_future()
        job = self._out.put(b"\n".join(lines) + b"\n", lambda exc: _settle(writing, exc))
        try:
            done, _ = await asyncio.wait({writing}, timeout=self.STALL_S)
        except asyncio.CancelledError:  # close() ran out of time: the writer spills what is left
            writing.cancel()
            took = job.data.count(b"\n", 0, self._out.take_back(job))
            del lines[:took]
            self.written_total += took
            raise
        if done:
            if writing.exception() is not None and job.written:  # what stdout took is not spilled
                took = job.data.count(b"\n", 0, job.written)
                del lines[:took]
                self.written_total += took
            writing.result()  # an error: the batch goes to the spill
            return
        # Counted as written (by the writer, or done() for a replayed batch): if it never ends,
        # close takes back (_unconfirmed) into the spill the lines stdout has not taken.
        self._writing, self._writing_lines, self._job, self._job_from = writing, lines, job, self._replaying
        log.warning("usage sink stdout: not being read; %d events are written when it is, later ones "
                    "wait in the spill", len(lines))

    @property
    def written_so_far(self) -> int:
        writing, job = self._writing, self._job
        if writing is None or job is None or (writing.done() and not writing.cancelled()
                                              and writing.exception() is None):
            return self.written_total
        # The stalled batch counts as far as stdout has taken it: _done_writing or _unconfirmed
        # take back only the rest.
        return self.written_total - len(self._writing_lines) + job.data.count(b"\n", 0, job.written)

    def _done_writing(self) -> bool:
        """Whether the batch stdout was slow to take has been written (or failed: spilled again)."""
        writing = self._writing
        if writing is None:
            return True
        if not writing.done():
            return False
        self._writing, lines, self._writing_lines, job = None, self._writing_lines, [], self._job
        self._job = None
        if writing.exception() is not None:
            assert job is not None
            lines = lines[job.data.count(b"\n", 0, job.written):]  # stdout took the others
            self.written_total -= len(lines)
            # older than what was spilled since
            if self.spill is None or not self.spill.append_first(lines, self._job_from):
                self._lost(len(lines), f"stdout failed: {writing.exception()}")
        return True

    def _unconfirmed(self) -> list[bytes]:
        if self._done_writing():
            return []
        writing, job, lines = self._writing, self._job, self._writing_lines
        assert writing is not None and job is not None
        writing.cancel()  # nobody waits for it: the thread's TakenBack is not an error to log
        self._taken_from = self._job_from
        self._writing, self._writing_lines, self._job = None, [], None
        # The thread writes no more of it: the lines stdout has not taken go to the spill, and
        # never reach stdout from this process (nor half of one: whole_lines).
        lines = lines[job.data.count(b"\n", 0, self._out.take_back(job)):]
        if lines:
            self.written_total -= len(lines)
            log.warning("usage sink stdout: %d events still waiting for stdout to be read at stop: kept "
                        "in the spill", len(lines))
        return lines


def _stdout() -> int | BinaryIO:
    """stdout's file descriptor, looked up per batch (it may have been replaced); its binary
    buffer when it has none (a test's capture)."""
    out = sys.stdout
    try:
        return out.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return out.buffer


def _settle(writing: asyncio.Future[None], exc: BaseException | None) -> None:
    """From the writer thread: the batch's outcome, on the loop's thread."""
    def settle() -> None:
        if not writing.done():
            writing.set_result(None) if exc is None else writing.set_exception(exc)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        writing.get_loop().call_soon_threadsafe(settle)


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
        self._look_at_end = False  # whether the file may end inside a line (a write failed part way)
        try:
            self._open()
        except OSError as exc:
            raise ValueError(f"usage sink {self.name!r}: cannot open: {exc.strerror}") from None

    def _open(self) -> None:
        # Unbuffered: a write that fails leaves nothing in a buffer to be written later, beside
        # the copy the spill keeps. Opened, the file is looked at: a process stopped while the
        # disk was full may have left it inside a line.
        self._file = open(self.path, "ab", buffering=0)
        st = os.fstat(self._file.fileno())
        self._id = (st.st_dev, st.st_ino)
        self._look_at_end = st.st_size > 0

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
        data = b"\n".join(lines) + b"\n"
        if self._look_at_end and not _ends_a_line(self.path):
            # What a write that failed part way (a full disk) left of its first line is ended
            # there, a line no reader takes for an event, instead of swallowing this batch's
            # first one. The batch it belonged to is in the spill, whole.
            data = b"\n" + data
        self._look_at_end = True
        view = memoryview(data)
        while view:  # a raw write may take part of it; the next one then says why not the rest
            view = view[self._file.write(view):]
        self._look_at_end = False

    async def _release(self) -> None:
        self._shut()


def _ends_a_line(path: str) -> bool:
    """Whether the file is empty or ends with a newline (True when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return True
            f.seek(size - 1)
            return f.read(1) == b"\n"
    except OSError:
        return True


# KEYS: the stream, the event's marker. ARGV: the line, maxlen, the marker's life in seconds.
# The marker is set after the XADD: a script that fails stops at the failing command and keeps
# what it wrote before it, so a marker set first would survive an XADD refused (WRONGTYPE: the
# stream's name held another kind of key), and the spill's replay would find it and add nothing.
_XADD_ONCE = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'data', ARGV[1])
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
end
return 1
"""
MARKER_S = 7 * 86400  # an event replayed later than this after its first write could land twice


class RedisSink(UsageSink):
    """``XADD stream MAXLEN ~ maxlen * data <json>`` once per event (a marker, ``aisix:usage:sent:
    <sha1 of the line>``, says it landed), one pipeline per batch."""

    def __init__(self, spec: SinkSpec, queue_size: int = 10000) -> None:
        super().__init__(spec.name, queue_size)
        self.stream = spec.stream
        self.maxlen = spec.maxlen
        self._url = spec.target
        self._redis: aioredis.Redis | None = None
        self._xadd: Any = None  # the script, registered at start

    async def start(self) -> None:
        if self._redis is None:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # One immediate retry: the first command on a connection Redis dropped fails once.
            self._redis = aioredis.Redis.from_url(
                self._url, socket_timeout=_REDIS_TIMEOUT_S, socket_connect_timeout=_REDIS_TIMEOUT_S,
                retry=Retry(NoBackoff(), 1))
            self._xadd = self._redis.register_script(_XADD_ONCE)
        await super().start()

    async def _write(self, lines: list[bytes]) -> None:
        assert self._redis is not None  # start() ran
        async with self._redis.pipeline(transaction=False) as pipe:  # reset even when it fails
            for line in lines:
                marker = "aisix:usage:sent:" + hashlib.sha1(line).hexdigest()
                await self._xadd(keys=[self.stream, marker], args=[line, self.maxlen, MARKER_S], client=pipe)  # queued
            await pipe.execute()

    async def _release(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

