"""The access log's buffered writer: one write per 64 KiB of lines, at most a second late, all of
it on flush (a stop). A pipe stands in for stderr."""

from __future__ import annotations

import asyncio
import os
import threading

from aisix.access_log import Writer
from aisix.background import Background


def pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    return r, w


def drain(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


async def test_lines_wait_for_size_or_time_and_a_flush_writes_them_all() -> None:
    r, w = pipe()
    try:
        writer = Writer(Background("test-stderr", lambda: w))
        writer.add("one\n")
        writer.add("two\n")
        assert drain(r) == b""  # buffered: no write per line
        writer.flush()
        assert writer.wait(5)
        assert drain(r) == b"one\ntwo\n"
        writer.flush()  # nothing waiting: nothing written
        assert writer.wait(5)
        assert drain(r) == b""
    finally:
        os.close(r)
        os.close(w)


async def test_a_full_buffer_is_written_at_once() -> None:
    r, w = pipe()
    try:
        writer = Writer(Background("test-stderr", lambda: w))
        line = "x" * 1023 + "\n"
        for _ in range(Writer.LIMIT // len(line) - 1):
            writer.add(line)
        assert drain(r) == b""
        writer.add(line)  # reaches the limit
        assert writer.wait(5)
        written = b""
        while chunk := drain(r):  # the pipe may return it in pieces
            written += chunk
        assert written == line.encode() * (Writer.LIMIT // len(line))
    finally:
        os.close(r)
        os.close(w)


async def test_a_line_is_written_within_the_interval() -> None:
    r, w = pipe()
    loop = asyncio.get_running_loop()
    try:
        writer = Writer(Background("test-stderr", lambda: w))
        writer.INTERVAL = 0.05  # type: ignore[misc] (the test's own, shorter)
        readable = asyncio.Event()
        loop.add_reader(r, readable.set)
        started = loop.time()
        writer.add("late\n")
        await asyncio.wait_for(readable.wait(), 5)
        assert drain(r) == b"late\n"
        assert loop.time() - started >= 0.04  # by the timer, not at once
    finally:
        loop.remove_reader(r)
        os.close(r)
        os.close(w)


async def test_the_stamp_is_loggings_format() -> None:
    stamp = Writer().stamp()
    date, clock = stamp.split(" ")
    assert len(date) == 10 and date[4] == date[7] == "-"
    assert len(clock) == 12 and clock[8] == "," and clock[:8].count(":") == 2


def test_lines_past_what_may_wait_for_a_stopped_reader_are_dropped_and_told() -> None:
    # A pipe nobody reads: the writer thread blocks in the first write (more than the pipe holds),
    # what is offered past the limit meanwhile is dropped, and the next line taken says how many.
    r, w = os.pipe()
    try:
        out = Background("test-stderr", lambda: w, limit=100_000, notice=lambda n: b"%d dropped\n" % n)
        first = b"a" * 70_000 + b"\n"  # more than the pipe holds: the thread waits for a reader
        out.offer(first)
        out.offer(b"b" * 40_000 + b"\n", 3)  # 110,002 bytes would wait: dropped
        out.offer(b"c\n")  # 70,003 would wait: taken, the count of the dropped ahead of it
        got = b""
        while len(got) < len(first) + len(b"3 dropped\nc\n"):
            got += os.read(r, 1 << 20)
        assert out.wait(5)
        out.offer(b"ok\n")
        assert out.wait(5)
        got += os.read(r, 1 << 20)
        assert got == first + b"3 dropped\nc\nok\n"  # told once
    finally:
        os.close(r)
        os.close(w)


def test_take_back_does_not_wait_on_a_piece_that_hangs() -> None:
    # take_back runs on the event loop. A piece under way holds the writer's lock for its write;
    # on a terminal stopped by ^S such a write waits although poll said writable, and the stop
    # waited with it. Held here by a thread that stands in for that write.
    r, w = os.pipe()
    try:
        out = Background("test-stdout", lambda: w, whole_lines=True)
        job = out.put(b"one\ntwo\n")
        assert out.wait(5) and os.read(r, 100) == b"one\ntwo\n" and job.written == 8
        hanging = out.put(b"three\n")  # as if its piece were being written: the lock is held
        held, release = threading.Event(), threading.Event()

        def write_that_hangs() -> None:
            with out._piece:
                held.set()
                release.wait(10)

        t = threading.Thread(target=write_that_hangs)
        t.start()
        held.wait(5)
        try:
            written = out.take_back(hanging)
            assert t.is_alive(), "take_back waited for the write under way"
            assert written == hanging.written and hanging.taken_back
        finally:
            release.set()
            t.join(10)
    finally:
        os.close(r)
        os.close(w)
