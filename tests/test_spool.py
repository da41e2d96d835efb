"""spool.py: a small body stays in memory, a large one goes to an unlinked temp file, and all
spools of the process together hold at most MEMORY_BUDGET in memory."""

from __future__ import annotations

import os

import pytest

from aisix import spool
from aisix.spool import Spool


def test_small_in_memory_large_on_disk_and_replayable() -> None:
    small, large = Spool(1024), Spool(1024)
    small.write(b"a" * 1000)
    large.write(b"b" * 1000)
    large.write(b"c" * 1000)
    assert small._file is None and large._file is not None
    assert b"".join(large.replay()) == b"b" * 1000 + b"c" * 1000
    assert b"".join(large.replay()) == b"b" * 1000 + b"c" * 1000  # again: nothing consumed
    large.write(b"d")
    assert b"".join(large.replay()).endswith(b"cd")  # reading left the writes appending
    small.close()
    large.close()
    assert Spool.in_memory == 0


def test_the_process_wide_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool, "MEMORY_BUDGET", 3000)
    before = Spool.in_memory
    spools = [Spool(2000) for _ in range(3)]
    for s in spools:
        s.write(os.urandom(1500))
    assert [s._file is None for s in spools] == [True, True, False]  # the third went to disk
    assert Spool.in_memory == before + 3000
    for s in spools:
        s.close()
    assert Spool.in_memory == before


def test_what_is_held_in_memory_cannot_change_under_it() -> None:
    """Pieces are kept as written when they cannot change (bytes, a view of bytes it mostly
    covers) and copied otherwise: the caller's bytearray may be reused after write()."""
    s = Spool(1 << 20)
    buf = bytearray(b"x" * 100)
    whole = bytes(range(256)) * 4
    s.write(buf)
    s.write(memoryview(whole)[:900])  # most of an immutable chunk: kept as is
    s.write(memoryview(whole)[:10])   # a sliver of one: copied, so as not to hold the chunk
    buf[:] = b"y" * 100
    assert b"".join(s.replay()) == b"x" * 100 + whole[:900] + whole[:10]
    assert [type(p) for p in s._head] == [bytes, memoryview, bytes]
    assert b"".join(s.chunks()) == b"x" * 100 + whole[:900] + whole[:10]
    assert s.size == 0 and Spool.in_memory == 0
