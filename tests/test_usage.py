"""Usage sinks against real files, a real stdout and a real redis-server: nothing is mocked."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis

from aisix.specs import parse_sink
from aisix.usage import UsageSink

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def make_sink(spec: str, queue_size: int = 10000) -> UsageSink:
    """A sink as the gateway makes one: the spec parsed (as config.yaml's usage.sink), then built."""
    return UsageSink.create(parse_sink(spec), queue_size)


def events(n: int, start: int = 0) -> list[dict]:
    return [{"request_id": f"req-{i}", "route": "speech", "status": 200, "bytes_out": i} for i in range(start, start + n)]


def lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on a fixed port, so it can be stopped and started again."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.dir = workdir
        self.password = password
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while True:
            try:
                with self.client() as r:
                    r.ping()
                return self
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=2)

    def url(self, query: str) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0?{query}"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, password="s3cret-pw").start()
    yield server
    server.stop()


# --- file sink -------------------------------------------------------------------------------

async def test_file_sink_writes_every_event_in_order(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    sink = make_sink(f"file:{path}")
    await sink.start()
    sent = events(1000)
    for i, event in enumerate(sent):
        sink.emit(event)
        if i % 97 == 0:
            await asyncio.sleep(0)          # let the writer take several batches
    await sink.close()
    assert lines(path) == sent
    assert (sink.written_total, sink.dropped_total) == (1000, 0)


async def test_close_flushes_everything_queued(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    sink = make_sink(f"file:{path}")
    await sink.start()
    for event in events(5000):
        sink.emit(event)
    await sink.close()
    assert len(path.read_bytes().splitlines()) == 5000
    assert sink.written_total == 5000


async def test_full_queue_drops_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    sink = make_sink(f"file:{path}", queue_size=10)
    for event in events(100):               # the writer has not run yet: the queue fills at 10
        sink.emit(event)                    # (emit never awaits, so it cannot wait for room)
    assert sink.dropped_total == 90
    await sink.start()
    await sink.close()
    assert (sink.written_total, sink.dropped_total) == (10, 90)
    assert lines(path) == events(10)
    sink.emit({"late": True})               # after close: counted, not raised
    assert sink.dropped_total == 91


async def test_unencodable_event_costs_only_itself(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "usage.jsonl"
    sink = make_sink(f"file:{path}")
    await sink.start()
    sink.emit({"n": 1})
    sink.emit({"n": object()})
    sink.emit({"n": 3})
    await sink.close()
    assert lines(path) == [{"n": 1}, {"n": 3}]
    assert (sink.written_total, sink.dropped_total) == (2, 1)
    assert "not encodable" in caplog.text


async def test_file_rotated_away_is_followed_by_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    sink = make_sink(f"file:{path}")
    await sink.start()
    for event in events(3):
        sink.emit(event)
    await until(lambda: sink.written_total == 3)
    first_inode = path.stat().st_ino

    path.rename(tmp_path / "usage.jsonl.1")  # logrotate without copytruncate, no SIGHUP
    for event in events(3, 3):
        sink.emit(event)
    await until(lambda: sink.written_total == 6)
    assert path.stat().st_ino != first_inode
    assert lines(tmp_path / "usage.jsonl.1") == events(3)
    assert lines(path) == events(3, 3)

    path.rename(tmp_path / "usage.jsonl.2")  # logrotate `create` + SIGHUP
    sink.reopen()
    assert path.exists() and path.stat().st_size == 0   # reopen made it, before any batch
    for event in events(3, 6):
        sink.emit(event)
    await sink.close()
    assert lines(tmp_path / "usage.jsonl.2") == events(3, 3)
    assert lines(path) == events(3, 6)
    assert (sink.written_total, sink.dropped_total) == (9, 0)


async def test_file_removed_with_its_directory_counts_the_loss_and_recovers(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()
    path = folder / "usage.jsonl"
    sink = make_sink(f"file:{path}")
    await sink.start()
    path.unlink()
    folder.rmdir()
    sink.emit({"n": 1})
    await until(lambda: sink.dropped_total == 1)
    folder.mkdir()
    sink.emit({"n": 2})
    await sink.close()
    assert lines(path) == [{"n": 2}]
    assert (sink.written_total, sink.dropped_total) == (1, 1)


# --- stdout sink -----------------------------------------------------------------------------

def test_stdout_sink_writes_json_lines() -> None:
    code = (
        "import asyncio\n"
        "from aisix.usage import UsageSink\nfrom aisix.specs import parse_sink\n"
        "async def main():\n"
        "    sink = UsageSink.create(parse_sink('stdout'))\n"
        "    await sink.start()\n"
        "    for i in range(3):\n"
        "        sink.emit({'i': i, 'route': 'speech'})\n"
        "    await sink.close()\n"
        "    assert sink.written_total == 3\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=30, check=True)
    assert [orjson.loads(line) for line in out.stdout.splitlines()] == [{"i": i, "route": "speech"} for i in range(3)]


# --- redis sink ------------------------------------------------------------------------------

async def test_redis_sink_adds_to_the_stream(redis_server: RedisServer) -> None:
    sink = make_sink(redis_server.url("stream=aisix:usage"))
    await sink.start()
    sent = events(50)
    for event in sent:
        sink.emit(event)
    await sink.close()
    assert (sink.written_total, sink.dropped_total) == (50, 0)
    with redis_server.client() as r:
        entries = r.xrange("aisix:usage")
    assert [orjson.loads(fields[b"data"]) for _, fields in entries] == sent
    assert all(list(fields) == [b"data"] for _, fields in entries)


async def test_redis_sink_trims_to_about_maxlen(redis_server: RedisServer) -> None:
    sink = make_sink(redis_server.url("stream=s&maxlen=100"))
    await sink.start()
    for i, event in enumerate(events(2000)):
        sink.emit(event)
        if i % 100 == 0:
            await asyncio.sleep(0)
    await sink.close()
    with redis_server.client() as r:
        length = r.xlen("s")
        last = orjson.loads(r.xrevrange("s", count=1)[0][1][b"data"])
    assert 100 <= length <= 200                    # `~`: whole nodes are trimmed, never below maxlen
    assert last == events(1, 1999)[0]


async def test_redis_down_counts_drops_and_recovers(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aisix.usage")
    sink = make_sink(redis_server.url("stream=s"))
    await sink.start()
    sink.emit({"n": 1})
    await until(lambda: sink.written_total == 1)

    redis_server.stop()
    for n in (2, 3, 4):                     # three batches fail, one warning in 10 s
        sink.emit({"n": n})
        await until(lambda: sink.dropped_total == n - 1)
    warnings = [r for r in caplog.records if r.name == "aisix.usage"]
    assert len(warnings) == 1
    assert "s3cret-pw" not in caplog.text and "***@127.0.0.1" in caplog.text

    redis_server.start()                    # empty again: no persistence
    sink.emit({"n": 5})
    await until(lambda: sink.written_total == 2)
    sink.emit({"n": 6})
    await sink.close()
    assert (sink.written_total, sink.dropped_total) == (3, 3)
    assert not any("s3cret-pw" in r.getMessage() for r in caplog.records)
    with redis_server.client() as r:
        assert [orjson.loads(f[b"data"]) for _, f in r.xrange("s")] == [{"n": 5}, {"n": 6}]


async def test_close_gives_up_after_timeout_and_counts_the_rest() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1 << 16):   # takes every command, never answers
            pass
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        sink = make_sink(f"redis://127.0.0.1:{port}/0?stream=s")
        await sink.start()
        for event in events(10):
            sink.emit(event)
        await asyncio.sleep(0.1)            # that batch is now in flight
        for event in events(5, 10):
            sink.emit(event)
        t0 = time.monotonic()
        await sink.close(timeout=0.3)
        assert time.monotonic() - t0 < 1.5
        assert (sink.written_total, sink.dropped_total) == (0, 15)
    finally:
        server.close()
        await server.wait_closed()


# --- specs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, says", [
    ("", "must be 'stdout'"),
    ("stderr", "must be 'stdout'"),
    ("file:", "no path given"),
    ("file:/no/such/dir/usage.jsonl", "/no/such/dir does not exist"),
    ("redis://:s3cret-pw@127.0.0.1:6379/0?stream=s&bogus=1", "unknown option(s) bogus"),
    ("redis://:s3cret-pw@127.0.0.1:6379/0?stream=s&maxlen=many", "invalid literal"),
    ("redis://:s3cret-pw@127.0.0.1:6379/0?maxlen=0", "at least 1"),
    ("redis://:s3cret-pw@127.0.0.1:port/0", "port"),
    ("redis://:s3cret-pw@127.0.0.1:6379/zero", "database 'zero'"),
    ("redis://:s3cret-pw@/0", "no host"),
    ("memcached://user:s3cret-pw@host", "must be 'stdout'"),
])
def test_invalid_spec_is_a_clear_error_without_secrets(spec: str, says: str) -> None:
    with pytest.raises(ValueError) as err:
        make_sink(spec)
    assert says in str(err.value)
    assert "s3cret-pw" not in str(err.value)


def test_unopenable_file_is_an_error_at_create(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot open: Is a directory"):
        make_sink(f"file:{tmp_path}")
