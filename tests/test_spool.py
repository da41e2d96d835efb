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
