"""Writes to stdout and stderr from a thread: a reader that stops never stalls the event loop.

Under systemd both go to the journal, through a socket that fills when the journal stalls; from a
terminal or a pipe, through whatever reads them. A blocking write on the event loop's thread then
holds every request, the health probes and the drain (found by running the gateway with a stdout
pipe nobody read). ``Background`` is one daemon thread that writes what it is given, in order,
with plain blocking writes below Python's buffers: a thread blocked at exit holds no lock the
interpreter needs, and being a daemon it does not hold the process either. Callers decide what a
slow reader costs: the usage sink's batches wait in the spill, log lines are dropped past a bound.
"""

from __future__ import annotations

import os
import queue
import select
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

Done = Callable[[BaseException | None], None]  # called on the writer thread once the bytes are written


class TakenBack(Exception):
    """The job's rest was taken back (``Background.take_back``) before it was written."""


class Job:
    """Bytes given to the thread: how many of them it has written, and whether to stop."""

    __slots__ = ("data", "done", "written", "taken_back")

    def __init__(self, data: bytes, done: Done | None) -> None:
        self.data, self.done = data, done
        self.written = 0
        self.taken_back = False


_POLL_MS = 100  # whole_lines: how often a write waiting for a reader looks whether it was taken back
TAKE_BACK_S = 0.5  # how long take_back waits for a piece under way


class Background:
    """One thread writing bytes, in the order given, to what ``target`` returns at each write (a
    file descriptor, or a binary file when there is none: a test's captured stdout).

    ``whole_lines`` (the usage sink's stdout): a file descriptor is written in pieces of whole
    lines of at most PIPE_BUF bytes, each once poll says it is writable. A piece that size is
    written whole or not at all on a pipe, so a reader that stops never holds half a line, and
    what has been written is known: ``take_back`` stops a job and says how much of it was."""

    def __init__(self, name: str, target: Callable[[], int | BinaryIO], limit: int | None = None,
                 notice: Callable[[int], bytes] | None = None, whole_lines: bool = False) -> None:
        self.name = name
        self._target = target
        self._whole_lines = whole_lines
        self._piece = threading.Lock()  # whole_lines: held while a piece is written
        self._limit = limit  # offer(): bytes waiting past which lines are dropped
        self._notice = notice  # offer(): the line that says how many were, once some is taken again
        self.dropped = 0  # lines offer() dropped and has not told of yet
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.pending = 0  # bytes given and not yet written (or failed)

    def put(self, data: bytes, done: Done | None = None) -> Job:
        job = Job(data, done)
        with self._lock:
            self.pending += len(data)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._jobs.put(job)
        return job

    def take_back(self, job: Job) -> int:
        """Write no more of ``job``; how many of its bytes were written (whole lines, on a pipe,
        with ``whole_lines``; a file object's job is all or nothing). Called from the event loop:
        a piece under way past TAKE_BACK_S (a terminal stopped by ^S: a write after poll said
        writable can still wait there) is not waited for; its lines may then land as well as be
        kept (an event twice, which readers count once), never half of one."""
        if not self._piece.acquire(timeout=TAKE_BACK_S):
            job.taken_back = True
            return job.written
        try:
            job.taken_back = True
            return job.written
        finally:
            self._piece.release()

    def offer(self, data: bytes, lines: int = 1) -> None:
        """put() ``lines`` lines, unless more than ``limit`` bytes already wait for a reader that
        stopped: then they are dropped, and counted in a line written ahead of the next taken."""
        if self._limit is not None and self.pending + len(data) > self._limit:
            self.dropped += lines
            return
        if self.dropped and self._notice is not None:
            data = self._notice(self.dropped) + data
        self.dropped = 0
        self.put(data)

    def wait(self, timeout: float) -> bool:
        """Wait until everything given is written, at most ``timeout`` s; whether it was."""
        with self._lock:
            return self._idle.wait_for(lambda: self.pending == 0, timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            error: BaseException | None = None
            try:
                target = self._target()
                if self._whole_lines and isinstance(target, int):
                    self._write_lines(target, job)
                else:
                    _write(target, job.data)
                    job.written = len(job.data)
            except Exception as exc:  # noqa: BLE001 (told to whoever waits; the thread goes on)
                error = exc
            with self._lock:
                self.pending -= len(job.data)
                if self.pending == 0:
                    self._idle.notify_all()
            if job.done is not None:
                job.done(error)

    def _write_lines(self, fd: int, job: Job) -> None:
        data, view = job.data, memoryview(job.data)
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        while job.written < len(data):
            end = min(job.written + select.PIPE_BUF, len(data))
            if end < len(data):
                cut = data.rfind(b"\n", job.written, end)
                if cut >= 0:  # else a line longer than PIPE_BUF: in pieces
                    end = cut + 1
            while not poller.poll(_POLL_MS):  # a reader that stopped: taken back meanwhile?
                if job.taken_back:
                    raise TakenBack()
            # Written under the lock take_back waits on: after POLLOUT a piece this size does not
            # wait for the reader, and what take_back reads is what the reader will have.
            with self._piece:
                if job.taken_back:
                    raise TakenBack()
                job.written += os.write(fd, view[job.written:end])


def _write(target: int | BinaryIO, data: bytes) -> None:
    if isinstance(target, int):
        view = memoryview(data)
        while view:
            view = view[os.write(target, view):]
    else:
        target.write(data)
        target.flush()


def _dropped(n: int) -> bytes:
    """A line in the log's own format (logs.FORMAT) telling how many lines were dropped."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    told = f"{n} log lines dropped while stderr was not read"
    return f"{stamp},{int(now % 1 * 1000):03d} WARNING aisix: {told}\n".encode()


# The log's lines and the access log's, in one order; 4 MiB may wait for a stderr nobody reads.
STDERR = Background("aisix-stderr", lambda: 2, limit=4 * 1024 * 1024, notice=_dropped)
