"""Bytes held until the alias is known: a small head in memory, the rest in an unlinked temp file.

Used only when the file part comes before the ``model`` part: the upstream cannot be chosen until
the alias is read, so what came before it waits here. Memory stays at ``memory_limit`` whatever the
file size; the temp file has no name on disk, so nothing is left behind by a crash.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import IO

_READ_SIZE = 256 * 1024


class Spool:
    __slots__ = ("_file", "_head", "_limit")

    def __init__(self, memory_limit: int = 64 * 1024) -> None:
        self._head = bytearray()
        self._file: IO[bytes] | None = None
        self._limit = memory_limit

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._file is None:
            if len(self._head) + len(chunk) <= self._limit:
                self._head += chunk
                return
            # Synchronous on purpose: a page-cache write of one chunk costs less than a thread hop.
            self._file = tempfile.TemporaryFile(prefix="aisix-spool-")
            self._file.write(self._head)
            self._head = bytearray()
        self._file.write(chunk)

    def chunks(self) -> Iterator[bytes | bytearray]:
        """Everything written, in order; the spool is empty afterwards."""
        if self._file is None:
            if self._head:
                yield self._head
            self._head = bytearray()
            return
        f = self._file
        f.seek(0)
        while chunk := f.read(_READ_SIZE):
            yield chunk
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._head = bytearray()
