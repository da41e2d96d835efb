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
    __slots__ = ("_file", "_head", "_limit", "size")
    in_memory = 0  # bytes held in memory by every spool of the process

    def __init__(self, memory_limit: int = 64 * 1024) -> None:
        self._head = bytearray()
        self._file: IO[bytes] | None = None
        self._limit = memory_limit
        self.size = 0

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        n = len(chunk)
        self.size += n
        if self._file is None:
            if len(self._head) + n <= self._limit and Spool.in_memory + n <= MEMORY_BUDGET:
                self._head += chunk
                Spool.in_memory += n
                return
            # Synchronous on purpose: a page-cache write of one chunk costs less than a thread hop.
            self._file = tempfile.TemporaryFile(prefix="aisix-spool-")
            self._file.write(self._head)
            self._drop_head()
        self._file.write(chunk)

    def _drop_head(self) -> None:
        Spool.in_memory -= len(self._head)
        self._head = bytearray()

    def chunks(self) -> Iterator[bytes | bytearray]:
        """Everything written, in order; the spool is empty afterwards."""
        if self._file is None:
            if self._head:
                yield self._head
            self._drop_head()
            return
        f = self._file
        f.seek(0)
        while chunk := f.read(_READ_SIZE):
            yield chunk
        self.close()

    def replay(self) -> Iterator[bytes | bytearray]:
        """Everything written so far, in order, leaving it in place (reads do not move the file's
        position, so later writes still append)."""
        if self._file is None:
            if self._head:
                yield bytes(self._head)
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
