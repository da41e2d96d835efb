"""A 200 MiB upload, in either field order, does not grow the gateway's memory by the file's size."""

from __future__ import annotations

import asyncio
import gc
import io
import time
import types
import weakref
from pathlib import Path

import aiohttp
import pytest

from aisix.keys import LIVE, POOL

from tests.fakes import Behaviour, FakeUpstream
from tests.gateway import TEAM_A, Gateway
from tests.test_policies import InProcess
from tests.test_transcriptions import BOUNDARY

MIB = 1024 * 1024
FILE_SIZE = 200 * MIB
LIMIT_KIB = 64 * 1024
_MODEL = b'--' + BOUNDARY.encode() + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-prod\r\n'
_FILE_HEAD = (b'--' + BOUNDARY.encode() + b'\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
              b'Content-Type: audio/wav\r\n\r\n')
_END = b"--" + BOUNDARY.encode() + b"--\r\n"


def big_length(file_size: int) -> int:
    """The Content-Length of big_body(…, file_size)."""
    return len(_MODEL) + len(_FILE_HEAD) + file_size + 2 + len(_END)


async def big_body(model_first: bool, file_size: int = FILE_SIZE):
    """A multipart upload of file_size bytes (whole MiB), made while it is sent."""
    block = bytes(range(256)) * (MIB // 256)
    if model_first:
        yield _MODEL
    yield _FILE_HEAD
    for _ in range(file_size // MIB):
        yield block
    yield b"\r\n"
    if not model_first:
        yield _MODEL
    yield _END


@pytest.mark.parametrize("model_first", [True, False], ids=["model-first", "file-first"])
async def test_big_upload_keeps_memory_flat(gateway: Gateway, fake: FakeUpstream, model_first: bool) -> None:
    fake.behaviour = Behaviour(keep_body=False)
    length = big_length(FILE_SIZE)
    gateway.reset_peak()
    before = gateway.rss_kib()
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/audio/transcriptions", data=big_body(model_first),
                          headers={"Authorization": f"Bearer {TEAM_A}", "Content-Length": str(length),
                                   "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}) as r:
            assert r.status == 200, await r.text()
    got = fake.wait_received()[0]
    assert got.complete and got.size == length - len(b"whisper-prod") + len(b"whisper-1")
    growth = gateway.peak_rss_kib() - before
    assert growth < LIMIT_KIB, f"RSS grew by {growth // 1024} MiB on a {FILE_SIZE // MIB} MiB upload"


def _ours(thing: object) -> bool:
    """An object of the gateway's own making: an aisix class's, or a frame of aisix code."""
    if isinstance(thing, types.FrameType):
        return "/aisix/" in thing.f_code.co_filename
    return type(thing).__module__.startswith("aisix.")


def _left_for_the_collector() -> list[str]:
    """Collect now: the names of aisix's objects and frames that were in reference cycles."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return sorted({type(o).__name__ if not isinstance(o, types.FrameType) else o.f_code.co_name
                       for o in gc.garbage if _ours(o)})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def test_callers_leaving_leave_nothing_for_the_collector(fake: FakeUpstream, tmp_path: Path) -> None:
    """The gateway collects cyclic garbage rarely (server._steady_gc), so a request whose end left
    a reference cycle held its connections and buffers until then: the RSS grew by 20 MiB over a
    few rounds of wrk, whose callers leave mid-request at each round's end. Callers leave here
    mid-answer (speech) and mid-upload (transcriptions, model first, the upload under way
    upstream); afterwards no object or frame of aisix's is left for the collector."""
    fake.behaviour = Behaviour(speech_chunks=20, chunk_delay=0.05)
    speech = b'{"model":"tts-prod","input":"hello","voice":"alloy"}'
    upload_head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEAM_A}\r\n"
                   f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                   f"Content-Length: {big_length(8 * MIB)}\r\n\r\n").encode()
    gc.collect()
    gc.disable()
    try:
        async with InProcess(tmp_path, fake.base_url, time.time, {}, like_the_server=True) as gw:
            app = gw.app
            host, port = gw.url.removeprefix("http://").rsplit(":", 1)
            for _ in range(3):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEAM_A}\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {len(speech)}\r\n\r\n".encode() + speech)
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                await asyncio.wait_for(reader.read(1000), 10)  # the first audio: then the caller leaves
                writer.transport.abort()
                await asyncio.wait_for(app[LIVE].idle.wait(), 10)

                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(upload_head + _MODEL + _FILE_HEAD + bytes(MIB))
                for _ in range(10_000):  # until the upload is under way upstream (a turn of the loop each)
                    if app[POOL]._in_use:
                        break
                    await asyncio.sleep(0)
                assert app[POOL]._in_use, "the upload never went upstream"
                writer.transport.abort()  # mid-file
                await asyncio.wait_for(app[LIVE].idle.wait(), 10)
            ours = _left_for_the_collector()
    finally:
        gc.enable()
    assert ours == [], " ".join(ours)


@pytest.mark.parametrize("ending", ["second-model-part", "unknown-alias", "failover-speech", "failover-upload",
                                    "upstream-error"])
async def test_other_endings_leave_nothing_for_the_collector(fake: FakeUpstream, tmp_path: Path, ending: str) -> None:
    """As above, for requests that end otherwise: a form refused mid-stream (a second model
    part after the file: 400), a refusal before any upstream (404), a failover (the first target answers 503) of speech and of an
    upload (copied to disk as it goes, then replayed), an upstream error relayed as it came."""
    from tests.test_transcriptions import form

    targets = [{"provider_key": "fake", "model_name": "w-a"}, {"provider_key": "fake", "model_name": "w-b"}]
    models = [{"display_name": "whisper-ha", "retry": {"max_attempts": 2}, "cooldown": {"failures": 1_000_000},
               "targets": [{**targets[0], "priority": 0}, {**targets[1], "priority": 1}]}]
    fake.behaviour = Behaviour(status=503, status_only_for=b"w-a") if ending.startswith("failover") else \
        Behaviour(status=500) if ending == "upstream-error" else Behaviour()
    speech = b'{"model":"whisper-ha","input":"hello","voice":"alloy"}'
    if ending == "second-model-part":
        body, ctype = form("model", "file", ("model", b"whisper-prod"), file=bytes(2 * MIB))
        path, expected = "/v1/audio/transcriptions", 400
    elif ending in ("failover-upload", "upstream-error"):
        body, ctype = form("model", "file", model=b"whisper-ha", file=bytes(2 * MIB))
        path, expected = "/v1/audio/transcriptions", 200 if ending == "failover-upload" else 500
    elif ending == "unknown-alias":
        body, ctype, path, expected = speech.replace(b"whisper-ha", b"nobody"), "application/json", "/v1/audio/speech", 404
    else:
        body, ctype, path, expected = speech, "application/json", "/v1/audio/speech", 200
    gc.collect()
    gc.disable()
    try:
        async with InProcess(tmp_path, fake.base_url, time.time, {}, like_the_server=True,
                             models=models) as gw:
            async with aiohttp.ClientSession() as s:
                for _ in range(3):
                    async with s.post(gw.url + path, data=io.BytesIO(body), headers={"Authorization": f"Bearer {TEAM_A}",
                                                                         "Content-Type": ctype}) as r:
                        await r.read()
                        assert r.status == expected
            await asyncio.wait_for(gw.app[LIVE].idle.wait(), 10)
            ours = _left_for_the_collector()
    finally:
        gc.enable()
    assert ours == [], " ".join(ours)


@pytest.mark.parametrize("ending", ["caller-closes", "caller-vanishes"])
async def test_a_realtime_session_leaves_nothing_for_the_collector(tmp_path: Path, ending: str) -> None:
    """A realtime session, closed by its caller or cut off (the socket aborted), leaves nothing of
    aisix's for the collector either."""
    from tests.fake_realtime import FakeRealtime, Script
    from tests.test_realtime import bearer, next_event, resources

    rt = FakeRealtime().start()
    rt.script = Script(echo=True)
    gc.collect()
    gc.disable()
    try:
        async with InProcess(tmp_path, rt.base_url, time.time, {}, like_the_server=True, **resources(rt)) as gw:
            url = gw.url.replace("http://", "ws://") + "/v1/realtime?model=rt-voice"
            async with aiohttp.ClientSession() as s:
                for _ in range(2):
                    ws = await s.ws_connect(url, headers=bearer())
                    await ws.send_str('{"type":"response.cancel"}')
                    assert (await next_event(ws)) == {"type": "response.cancel"}
                    if ending == "caller-closes":
                        await ws.close()
                    else:
                        ws._response.connection.transport.abort()  # type: ignore[union-attr]
                    await asyncio.wait_for(gw.app[LIVE].idle.wait(), 15)
            ours = _left_for_the_collector()
    finally:
        gc.enable()
        rt.stop()
    assert ours == [], " ".join(ours)


class _Cycle:
    """An object in a reference cycle, as a forgotten connection or upload would be."""

    def __init__(self, size: int) -> None:
        self.me = self
        self.buffer = bytearray(size)


async def test_cycles_are_collected_on_a_timer_when_the_automatic_collector_would_not() -> None:
    """server.Collector: with the automatic collector off (it hardly runs under steady load at
    the gateway's thresholds), a cycle that became garbage young is freed at the next run, and
    one that aged before it became garbage at the next full run."""
    from aisix.server import Collector

    loop = asyncio.get_running_loop()
    gc.collect()
    gc.disable()
    collector = Collector(loop, every_s=0.01, full_every=5)
    try:
        young_freed, old_freed = asyncio.Event(), asyncio.Event()
        young = _Cycle(4 * MIB)
        weakref.finalize(young, young_freed.set)
        old = _Cycle(4 * MIB)
        weakref.finalize(old, old_freed.set)
        gc.collect()  # `old` survives a full collection: it is in the oldest generation now
        del young, old
        await asyncio.wait_for(young_freed.wait(), 10)
        await asyncio.wait_for(old_freed.wait(), 10)
    finally:
        collector.stop()
        gc.enable()
