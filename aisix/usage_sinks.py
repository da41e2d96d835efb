"""Where usage.UsageSink's batches go: stdout (written from a thread, with its stall handling),
a file (JSON lines, reopened after rotation, mended after a write cut mid-line), a Redis stream
(one XADD per event, with a marker so a replayed event lands once). Each says only how a batch
of encoded lines is written and what it holds; the queue, the writer, the spill and its replay
are usage.UsageSink's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from .background import Background, Job
from .specs import SinkSpec
from .usage import UsageSink

if TYPE_CHECKING:  # imported when a Redis sink starts: stdout and file sinks never need redis-py
    import redis.asyncio as aioredis

log = logging.getLogger("aisix.usage")  # the sinks' lines are the usage sink's, as before the split

_REDIS_TIMEOUT_S = 2.0


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

