"""Usage events the sink could not take, kept on local disk until it can: billing data is never
dropped for want of a backend, only for want of disk.

Each process appends to a file of its own, ``spill-<pid>-<start>.jsonl`` in ``usage.spill_dir``,
holding an exclusive ``flock`` on it for its life. Lines are the encoded events, in the order they
were emitted. Replay reads a file from the start, in batches, and records how far it got in a
sidecar ``.offset`` file (written and renamed, so a crash leaves the old or the new offset, never
half of one); a file replayed to its end is deleted. A file whose lock can be taken belongs to no
living process (one that was killed, or this one before a restart): it is adopted and replayed
before this process's own, oldest first. Such files are looked for when the sink starts and
every minute after (usage.ADOPT_S), so a process that is not restarted does not leave its events
behind. A last line without its newline (the process was killed while writing it) is skipped and
logged: that event never fully reached the disk.

Synchronous file I/O on purpose, in the sink's writer task only: appends and reads are page-cache
operations, a spill only happens while the backend is down, and the look for others' files is a
directory listing a minute.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

BATCH_BYTES = 256 * 1024  # replayed per write to the sink
_FIRSTS = 1_000_000  # names (in ns) before a process's own file left for Spill.append_first


class Spill:
    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)
        self.spilled_total = 0  # events appended to the spill
        self._own: Path | None = None
        self._file: IO[bytes] | None = None
        self._queue: list[Path] = []  # files to replay, oldest first; this process's own last
        self._reader: _Reader | None = None
        self._firsts = 0  # files made by append_first

    def open(self) -> None:
        """Adopt what dead processes left; this process's own file is made on the first append."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.adopt()

    @property
    def pending(self) -> bool:
        return bool(self._queue) or self._reader is not None

    def append(self, lines: list[bytes]) -> bool:
        """Keep these events; False when the disk would not take them (they are lost)."""
        try:
            if self._file is None:
                self._file, self._own = _create(self.dir / f"spill-{os.getpid()}-{time.time_ns()}.jsonl")
            self._file.write(b"\n".join(lines) + b"\n")
            self._file.flush()
        except OSError as exc:
            log.error("usage spill %s: cannot write %d events: %s", self.dir, len(lines), exc.strerror or exc)
            return False
        self.spilled_total += len(lines)
        if self._own is not None and self._own not in self._queue:
            self._queue.append(self._own)
        return True

    def append_first(self, lines: list[bytes], read_from: Path | None = None) -> bool:
        """Keep events older than all this process's spill holds (a batch handed to the sink before
        those were spilled, taken back after all): a file of their own, named to sort, and so be
        replayed, after earlier such files and before this process's own. A batch that was read
        from a spill file (``read_from``, ``reading`` when it was handed out) goes before the rest
        of that file instead, or before the file queued after it once that one was read to its
        end: a stopped process's file is older than this process's own. Without one, append()."""
        anchor = self._own
        if read_from is not None:
            anchor = read_from if read_from in self._queue else (self._queue[0] if self._queue else None)
        if anchor is None:
            return self.append(lines)
        self._firsts += 1
        started = _started(anchor) - _FIRSTS + self._firsts  # a millisecond before it, in order
        try:
            f, path = _create(self.dir / f"spill-{os.getpid()}-{started}.jsonl")
            with f:  # its lock goes with it: adopted and replayed like a stopped process's file
                f.write(b"\n".join(lines) + b"\n")
        except OSError as exc:
            log.error("usage spill %s: cannot write %d events: %s", self.dir, len(lines), exc.strerror or exc)
            return False
        self.spilled_total += len(lines)
        self._queue.insert(self._queue.index(anchor) if anchor in self._queue else len(self._queue), path)
        return True

    @property
    def reading(self) -> Path | None:
        """The file the last batch() came from, while it is replayed."""
        return self._reader.path if self._reader is not None else None

    def batch(self) -> list[bytes]:
        """The next events to replay, in order ([] when none are left); ``done()`` once the sink
        has taken them."""
        while True:
            if self._reader is None:
                if not self._queue:
                    return []
                try:
                    self._reader = _Reader(self._queue[0], own=self._queue[0] == self._own)
                except OSError:  # another process took it first (or it is gone): its business
                    self._queue.pop(0)
                    continue
            lines = self._reader.next()
            if lines:
                return lines
            self._finish_file()

    def done(self) -> None:
        """The last batch reached the sink: never replay it again. Without it, the next
        ``batch()`` is the same events again."""
        assert self._reader is not None
        self._reader.commit()

    def _finish_file(self) -> None:
        """The file under replay was read to its end: out of the queue (by its path: an adoption
        meanwhile may have put another file in front of it) and off the disk."""
        reader, self._reader = self._reader, None
        assert reader is not None
        self._queue.remove(reader.path)
        reader.remove()  # unlinked while still locked, by the reader or by this process's own handle
        if reader.path == self._own:  # start a new one next time: the old one is done with
            assert self._file is not None
            self._file.close()
            self._file, self._own = None, None

    def adopt(self) -> None:
        """Queue the spill files no living process holds (those already queued stay as they are)."""
        found = sorted(self.dir.glob("spill-*.jsonl"), key=lambda p: _started(p))
        for path in found:
            if path == self._own or path in self._queue:
                continue
            try:
                with open(path, "rb") as f:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at close: a probe only
            except BlockingIOError:
                continue  # a living process's own
            except OSError:
                continue
            self._queue.insert(len(self._queue) - (self._own in self._queue), path)  # before our own
            log.warning("usage spill: replaying %s, left by a process that stopped", path.name)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._file is not None:
            self._file.close()  # what is left stays on disk for the next start
            self._file = None


def _create(path: Path) -> tuple[IO[bytes], Path]:
    """This process's spill file, locked before it can be seen: made under a name no glob of
    ``adopt`` matches, locked, then renamed (another process's probe cannot take its lock first)."""
    temp = path.with_name("." + path.name + ".new")
    f = open(temp, "ab")  # noqa: SIM115 (held, and locked, for the process's life)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(temp, path)
    except OSError:
        f.close()
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return f, path


def _started(path: Path) -> int:
    try:
        return int(path.stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


class _Reader:
    """One spill file read from its committed offset, in whole lines."""

    def __init__(self, path: Path, own: bool) -> None:
        self.path = path
        self._offset_file = path.with_suffix(".offset")
        self._own = own
        self._f: IO[bytes] = open(path, "rb")  # noqa: SIM115 (held while the file is replayed)
        if not own:  # an adopted file: held while it is replayed, so only one process does
            try:
                fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(self._f.fileno()).st_nlink == 0:  # replayed and removed by another meanwhile
                    raise FileNotFoundError(path)
            except OSError:
                self._f.close()
                raise
        try:
            self.committed = int(self._offset_file.read_text())
        except (OSError, ValueError):
            self.committed = 0
        self._next = self.committed

    def next(self) -> list[bytes]:
        """The batch after the last committed one (the same one again when it was not)."""
        self._next = self.committed
        self._f.seek(self._next)
        data = self._f.read(BATCH_BYTES)
        if not data:
            return []
        end = data.rfind(b"\n")
        if end < 0:  # a line longer than a batch, or a last line without its newline
            more = self._f.readline()
            if more.endswith(b"\n"):
                data += more
                end = len(data) - 1
            elif not self._own:
                log.error("usage spill %s: a last line without its newline (%d bytes) is skipped: the "
                          "process was stopped while writing it", self.path.name, len(data) + len(more))
                return []
            else:
                return []  # this process is still writing it
        self._next += end + 1
        return data[:end].split(b"\n")

    def commit(self) -> None:
        self.committed = self._next
        tmp = self._offset_file.with_suffix(".offset.tmp")
        tmp.write_text(str(self.committed))
        os.replace(tmp, self._offset_file)

    def remove(self) -> None:
        # Unlinked before the lock goes with the close: a process that locks it after sees no
        # file (or one with no links) and no offset, rather than replaying it all again.
        for p in (self._offset_file, self.path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self._f.close()

    def close(self) -> None:
        self._f.close()
