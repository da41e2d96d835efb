"""Callers that leave or go silent, upstreams that stall: nothing is left behind, nothing looks complete."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.fakes import Behaviour, FakeUpstream
from tests.gateway import TEAM_A, Gateway, fd_targets
from tests.test_transcriptions import BOUNDARY, no_complete_request_reached

MODEL_PART = (b"--" + BOUNDARY.encode() + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
              b"whisper-prod\r\n")
FILE_HEAD = (b"--" + BOUNDARY.encode() + b'\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
             b"Content-Type: audio/wav\r\n\r\n")


def established_to(pid: int, port: int) -> int:
    """How many of the process's sockets are ESTABLISHED connections to 127.0.0.1:port."""
    inodes = {t[8:-1] for t in fd_targets(pid) if t.startswith("socket:[")}
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and inode in inodes and int(remote.split(":")[1], 16) == port:
            count += 1
    return count


def spool_files(pid: int) -> list[str]:
    return [t for t in fd_targets(pid) if "aisix-spool" in t]


async def open_upload(gw: Gateway, rid: str, length: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEAM_A}\r\n"
        f"x-aisix-request-id: {rid}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {length}\r\n\r\n".encode())
    return reader, writer


async def close(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()
    await asyncio.sleep(0)  # let the transport's close callback run on this loop


@pytest.mark.parametrize("model_first", [True, False], ids=["model-first", "file-first"])
async def test_caller_leaving_mid_upload(make_gateway, fake: FakeUpstream, model_first: bool) -> None:
    gw = make_gateway()
    rid = uuid.uuid4().hex
    reader, writer = await open_upload(gw, rid, 50_000_000)
    writer.write((MODEL_PART if model_first else b"") + FILE_HEAD)
    for _ in range(16):  # 2 MiB: past the in-memory head, so file-first spools to disk
        writer.write(os.urandom(128 * 1024))
        await writer.drain()
    await close(writer)
    event = gw.event(rid)
    assert (event["status"], event["error_code"]) == (499, "client_closed")
    assert event["bytes_in"] > 0
    assert spool_files(gw.pid) == []
    assert established_to(gw.pid, int(fake.base_url.split(":")[2].split("/")[0])) == 0
    await no_complete_request_reached(gw, fake)
    if not model_first:  # the alias never came: the upstream was never called
        assert [r.path for r in fake.received] == ["/v1/audio/speech"]


async def test_caller_leaving_mid_download_ends_the_upstream_request(make_gateway, fake: FakeUpstream) -> None:
    gw = make_gateway()
    fake.behaviour = Behaviour(speech_chunks=100, chunk_delay=0.1)
    fake_port = int(fake.base_url.split(":")[2].split("/")[0])
    rid = uuid.uuid4().hex
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/speech", json={"model": "tts-prod", "input": "x", "voice": "a"},
                          headers={"Authorization": f"Bearer {TEAM_A}", "x-aisix-request-id": rid}) as r:
            await r.content.readany()
            assert established_to(gw.pid, fake_port) == 1
    event = gw.event(rid)
    assert (event["status"], event["error_code"], event["stream"]) == (499, "client_closed", True)
    assert established_to(gw.pid, fake_port) == 0  # the upstream answer was not read to its end
    assert len(fake.sent_at) < 100


async def test_silent_caller_gets_408(make_gateway, fake: FakeUpstream) -> None:
    gw = make_gateway({"upstream": {"stream_idle_timeout_ms": 300}})
    rid = uuid.uuid4().hex
    reader, writer = await open_upload(gw, rid, 10_000)
    writer.write(MODEL_PART + FILE_HEAD + b"x" * 100)  # then nothing more
    head = await asyncio.wait_for(reader.read(4096), 10)
    assert head.startswith(b"HTTP/1.1 408") and b'"code":"client_timeout"' in head
    await close(writer)
    assert gw.event(rid)["error_code"] == "client_timeout"
    await no_complete_request_reached(gw, fake)


async def test_caller_that_stops_reading_is_cut_off(make_gateway, fake: FakeUpstream) -> None:
    gw = make_gateway({"upstream": {"stream_idle_timeout_ms": 300}})
    fake.behaviour = Behaviour(speech_chunks=400, speech_chunk_bytes=64 * 1024)  # 25 MiB, more than buffers hold
    rid = uuid.uuid4().hex
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=1024)
    writer.transport.set_write_buffer_limits(0)
    writer.transport.pause_reading()  # read nothing at all: the gateway's writes must stall
    body = b'{"model":"tts-prod","input":"x","voice":"a"}'
    writer.write(f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEAM_A}\r\n"
                 f"x-aisix-request-id: {rid}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    event = gw.event(rid, timeout=20)
    assert (event["status"], event["error_code"]) == (200, "client_timeout")
    await close(writer)


async def test_upstream_stalling_mid_answer_aborts_the_caller(make_gateway, fake: FakeUpstream) -> None:
    gw = make_gateway({"upstream": {"stream_idle_timeout_ms": 300}})
    fake.behaviour = Behaviour(fail="stall")
    rid = uuid.uuid4().hex
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/speech", json={"model": "tts-prod", "input": "x", "voice": "a"},
                          headers={"Authorization": f"Bearer {TEAM_A}", "x-aisix-request-id": rid}) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    event = gw.event(rid)
    assert (event["status"], event["error_code"]) == (200, "upstream_aborted")
