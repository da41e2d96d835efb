"""Load through ONE gateway process, then a check that nothing was left behind.

- 1,000 concurrent speech streams (the fake: 8 chunks of 8 KiB, 50 ms apart), all at once.
- 200 concurrent 25 MiB uploads, half model-first, half file-first (spooled), Content-Length kept.
- Afterwards: every request has its one 200 usage event, no request is in flight (the metrics
  gauge), the process holds no spool file, its non-socket fds are exactly those it had before,
  no connection from a caller is left, and its pooled upstream connections drain back to none.

Not part of `make test` (setup.cfg collects tests/ only): `make soak`. Bounded: each load has
its own deadline; the whole module takes about a minute here. The figures are printed (run with
-s, as `make soak` does) for the closing note.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes import Behaviour, FakeUpstream
from tests.gateway import TEAM_A, Gateway, fd_targets
from tests.test_disconnects import spool_files
from tests.test_memory import big_body, big_length
from tests.test_transcriptions import BOUNDARY

MIB = 1024 * 1024
STREAMS = 1000
CHUNKS, CHUNK_BYTES = 8, 8 * 1024
UPLOADS, UPLOAD_BYTES = 200, 25 * MIB
# Peak RSS caps. Measured here: ~85 MiB for the streams; 250-630 MiB for the uploads, 1.2-3 MiB per
# upload in flight. Traced with tracemalloc at 293 MiB RSS (2026-12-07): 128 MiB of it was body
# bytes as aiohttp's parser made them (about 640 KiB an upload: what its StreamReader buffers
# before it pauses reading a caller that sends on loopback speed, the chunk the rewriter is
# feeding and the one being written upstream), the rest the allocator's slack and uvloop's
# buffers. Holding the files would be 5,000 MiB.
SPEECH_RSS_CAP_MIB = 400
UPLOAD_RSS_CAP_MIB = 800
POOL = 1000  # upstream.max_connections (the documented default, set explicitly below)
AUTH = {"Authorization": f"Bearer {TEAM_A}"}
FIGURES: dict[str, Any] = {}


def _raise_fd_limit(want: int = 65536) -> None:
    """The gateway inherits this process's limit: ~2 fds per stream there, ~2 here."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 4 * STREAMS + 512, "fd limit too low for the soak"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream()
    upstream.start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def gw(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    _raise_fd_limit()
    gateway = Gateway(tmp_path_factory.mktemp("soak"), fake.base_url,
                      {"upstream": {"max_connections": POOL}, "metrics": {"listen": "127.0.0.1:0"}})
    gateway.args = ["--access-log", "off"]  # 1,200 log lines would only be noise here
    gateway.start()
    yield gateway
    gateway.stop()


def fd_census(pid: int, own_port: int, fake_port: int) -> dict[str, int]:
    """The process's fds by kind; its TCP sockets by peer (callers, the upstream, listeners)."""
    kinds: dict[str, int] = {"socket": 0, "other": 0}
    inodes = set()
    for target in fd_targets(pid):
        if target.startswith("socket:["):
            kinds["socket"] += 1
            inodes.add(target[8:-1])
        else:
            kinds["other"] += 1
    kinds.update(callers=0, upstream=0, listening=0)
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if inode not in inodes:
                continue
            if state == "0A":
                kinds["listening"] += 1
            elif int(remote.split(":")[1], 16) == fake_port:
                kinds["upstream"] += 1
            elif int(local.split(":")[1], 16) == own_port:
                kinds["callers"] += 1
    kinds["spool"] = len(spool_files(pid))
    return kinds


def ports(gw: Gateway, fake: FakeUpstream) -> tuple[int, int]:
    return int(gw.url.rsplit(":", 1)[1]), int(fake.base_url.split(":")[2].split("/")[0])


async def in_flight(gw: Gateway) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.metrics_url + "/metrics") as r:
            text = await r.text()
    return sum(float(m) for m in re.findall(r"^aisix_in_flight_requests\{[^}]*\} (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def baseline(gw: Gateway, fake: FakeUpstream) -> dict[str, int]:
    """Before any load (no upstream connection pooled yet)."""
    census = fd_census(gw.pid, *ports(gw, fake))
    census["rss_kib"] = gw.rss_kib()
    census["threads"] = _threads(gw.pid)
    FIGURES["fds before"] = {k: census[k] for k in ("socket", "other", "listening", "upstream", "spool")}
    return census


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


async def test_a_thousand_concurrent_speech_streams(gw: Gateway, fake: FakeUpstream,
                                                    baseline: dict[str, int]) -> None:
    fake.reset()
    fake.behaviour = Behaviour(speech_chunks=CHUNKS, speech_chunk_bytes=CHUNK_BYTES, chunk_delay=0.05)
    gw.reset_peak()
    rids = [f"soak-speech-{i}-{uuid.uuid4().hex[:8]}" for i in range(STREAMS)]

    async def one(s: aiohttp.ClientSession, rid: str) -> tuple[int, int, bool]:
        async with s.post(gw.url + "/v1/audio/speech", headers={**AUTH, "x-aisix-request-id": rid},
                          json={"model": "tts-prod", "input": f"soak {rid}", "voice": "alloy"}) as r:
            size = 0
            async for chunk in r.content.iter_any():
                size += len(chunk)
            return r.status, size, r.headers.get("Content-Type") == "audio/mpeg"

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as s:
        async with asyncio.timeout(120):
            results = await asyncio.gather(*(one(s, rid) for rid in rids))
    elapsed = time.monotonic() - started
    peak = gw.peak_rss_kib()
    FIGURES["speech"] = {"streams": STREAMS, "seconds": round(elapsed, 1), "peak_rss_mib": peak // 1024}
    print(f"\n{STREAMS} speech streams: {elapsed:.1f} s, peak RSS {peak // 1024} MiB")

    assert results == [(200, CHUNKS * CHUNK_BYTES, True)] * STREAMS
    # Concurrent, not one after the other: 8 chunks 50 ms apart is 0.35 s a stream.
    assert elapsed < STREAMS * 0.35 / 10
    all_events = gw.events(STREAMS, timeout=30)
    assert Counter(e["request_id"] for e in all_events if e["request_id"] in set(rids)) == Counter(rids)
    events = {e["request_id"]: e for e in all_events}
    assert all((events[r]["status"], events[r]["bytes_out"], events[r]["stream"]) == (200, CHUNKS * CHUNK_BYTES, True)
               for r in rids)
    assert peak < SPEECH_RSS_CAP_MIB * 1024, f"peak RSS {peak // 1024} MiB"


async def test_two_hundred_concurrent_25_mib_uploads(gw: Gateway, fake: FakeUpstream,
                                                     baseline: dict[str, int]) -> None:
    fake.reset()
    fake.behaviour = Behaviour(keep_body=False)
    gw.reset_peak()
    length = big_length(UPLOAD_BYTES)
    jobs = [(f"soak-upload-{i}-{uuid.uuid4().hex[:8]}", i % 2 == 0) for i in range(UPLOADS)]

    async def one(s: aiohttp.ClientSession, rid: str, model_first: bool) -> tuple[int, str]:
        async with s.post(gw.url + "/v1/audio/transcriptions", data=big_body(model_first, UPLOAD_BYTES),
                          headers={**AUTH, "x-aisix-request-id": rid, "Content-Length": str(length),
                                   "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}) as r:
            return r.status, (await r.json())["text"]

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as s:
        async with asyncio.timeout(150):
            results = await asyncio.gather(*(one(s, rid, first) for rid, first in jobs))
    elapsed = time.monotonic() - started
    peak = gw.peak_rss_kib()
    total_mib = UPLOADS * UPLOAD_BYTES // MIB
    FIGURES["uploads"] = {"uploads": UPLOADS, "mib": total_mib, "seconds": round(elapsed, 1),
                          "peak_rss_mib": peak // 1024}
    print(f"\n{UPLOADS} uploads of {UPLOAD_BYTES // MIB} MiB ({total_mib} MiB): {elapsed:.1f} s "
          f"({total_mib / elapsed:.0f} MiB/s), peak RSS {peak // 1024} MiB")

    assert results == [(200, "hello from the fake")] * UPLOADS
    forwarded = length - len(b"whisper-prod") + len(b"whisper-1")
    got = {r.headers["x-aisix-request-id"]: r for r in fake.wait_received(UPLOADS, timeout=30)}
    assert sorted(got) == sorted(rid for rid, _ in jobs)
    assert all(r.complete and r.size == forwarded and r.headers["Content-Length"] == str(forwarded)
               for r in got.values())
    all_events = gw.events(STREAMS + UPLOADS, timeout=30)
    ours = {rid for rid, _ in jobs}
    assert Counter(e["request_id"] for e in all_events if e["request_id"] in ours) == Counter(ours)
    events = {e["request_id"]: e for e in all_events}
    assert all((events[rid]["status"], events[rid]["bytes_in"]) == (200, length) for rid, _ in jobs)
    assert peak < UPLOAD_RSS_CAP_MIB * 1024, f"peak RSS {peak // 1024} MiB"


async def test_nothing_is_left_behind(gw: Gateway, fake: FakeUpstream, baseline: dict[str, int]) -> None:
    own_port, fake_port = ports(gw, fake)
    assert await in_flight(gw) == 0  # every exchange ended (its task is gone with it)
    after = fd_census(gw.pid, own_port, fake_port)
    FIGURES["fds right after"] = {k: after[k] for k in ("socket", "other", "callers", "upstream", "spool")}
    assert after["spool"] == 0
    assert after["other"] == baseline["other"], (baseline, after)  # files, pipes, epoll: exactly
    assert after["callers"] == 0  # the load's client sessions are closed
    assert after["listening"] == baseline["listening"]
    assert after["upstream"] <= POOL  # idle keep-alive connections in the pool, at most its size
    # The pool lets idle connections go after aiohttp's keep-alive (15 s): wait for that, bounded.
    started = time.monotonic()
    while fd_census(gw.pid, own_port, fake_port)["upstream"] and time.monotonic() - started < 45:
        await asyncio.sleep(0.5)  # polling an observable (the socket table), bounded by the deadline
    drained = fd_census(gw.pid, own_port, fake_port)
    FIGURES["fds after the pool drained"] = {k: drained[k] for k in ("socket", "other", "upstream", "spool")}
    FIGURES["pool drain seconds"] = round(time.monotonic() - started, 1)
    FIGURES["rss_mib before/after"] = (baseline["rss_kib"] // 1024, gw.rss_kib() // 1024)
    FIGURES["threads before/after"] = (baseline["threads"], _threads(gw.pid))
    print("\nsoak figures:")
    for name, value in FIGURES.items():
        print(f"  {name}: {value}")
    assert drained["socket"] == baseline["socket"], (baseline, drained)
    assert drained["other"] == baseline["other"]
    # Threads: at most the default executor's (DNS lookups run there), never one per request.
    assert _threads(gw.pid) <= baseline["threads"] + min(32, (os.cpu_count() or 1) + 4)
    # Still serving, and its answer is whole.
    fake.reset()
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/speech", headers=AUTH,
                          json={"model": "tts-prod", "input": "after the soak", "voice": "alloy"}) as r:
            assert r.status == 200 and len(await r.read()) == 3 * 4800
