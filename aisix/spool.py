"""Bytes kept on disk rather than in memory: a small head in memory, the rest in an unlinked temp file.

Used for what came before the ``model`` part (the upstream cannot be chosen until the alias is
read), and for the copy of an upload that a failover replays. Memory stays at ``memory_limit``
per spool whatever the size, and at ``MEMORY_BUDGET`` for all spools of the process together:
past either, the bytes go to the temp file. The temp file has no name on disk, so nothing is left
behind by a crash. Making one costs about 200-400 us (creating and freeing an unlinked file and
its pages), which is why a body that fits stays in memory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import IO

_READ_SIZE = 256 * 1024
MEMORY_BUDGET = 64 * 1024 * 1024  # what all spools of the process may hold in memory together


class Spool:
    __slots__ = ("_file", "_head", "_held", "_limit", "size")
    in_memory = 0  # bytes held in memory by every spool of the process

    def __init__(self, memory_limit: int = 64 * 1024) -> None:
        # In memory: the pieces as written, not one growing buffer (each growth of a bytearray
        # is a realloc and a copy). A piece that is a view of an immutable bytes object is kept
        # as it is, without a copy: the caller's chunk cannot change under it.
        self._head: list[bytes | memoryview] = []
        self._held = 0
        self._file: IO[bytes] | None = None
        self._limit = memory_limit
        self.size = 0

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        n = len(chunk)
        self.size += n
        if self._file is None:
            if self._held + n <= self._limit and Spool.in_memory + n <= MEMORY_BUDGET:
                self._head.append(_frozen(chunk))
                self._held += n
                Spool.in_memory += n
                return
            # Synchronous on purpose: a page-cache write of one chunk costs less than a thread hop.
            self._file = tempfile.TemporaryFile(prefix="aisix-spool-")
            self._file.writelines(self._head)
            self._drop_head()
        self._file.write(chunk)

    def _drop_head(self) -> None:
        Spool.in_memory -= self._held
        self._head = []
        self._held = 0

    def chunks(self) -> Iterator[bytes | memoryview]:
        """Everything written, in order; the spool is empty afterwards."""
        if self._file is None:
            head = self._head
            self._drop_head()
            self.size = 0
            yield from head
            return
        f = self._file
        f.seek(0)
        while chunk := f.read(_READ_SIZE):
            yield chunk
        self.close()

    def replay(self) -> Iterator[bytes | memoryview]:
        """Everything written so far, in order, leaving it in place (reads do not move the file's
        position, so later writes still append)."""
        if self._file is None:
            yield from list(self._head)  # a copy of the list: later writes do not join this replay
            return
        fd, end, at = self._file.fileno(), self.size, 0
        self._file.flush()
        while at < end:
            chunk = os.pread(fd, min(_READ_SIZE, end - at), at)
            if not chunk:
                raise OSError("spool file shorter than written")
            at += len(chunk)
            yield chunk

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._drop_head()
        self.size = 0


def _frozen(chunk: bytes | bytearray | memoryview) -> bytes | memoryview:
    """The chunk as something that cannot change: itself when it is immutable bytes, or a view of
    bytes it covers at least half of (a small view would keep a large chunk alive, past what
    the memory budget counts); otherwise a copy."""
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, memoryview) and isinstance(chunk.obj, bytes) and 2 * chunk.nbytes >= len(chunk.obj):
        return chunk
    return bytes(chunk)
