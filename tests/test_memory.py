"""A 200 MiB upload, in either field order, does not grow the gateway's memory by the file's size."""

from __future__ import annotations

import aiohttp
import pytest

from tests.fakes import Behaviour, FakeUpstream
from tests.gateway import TEAM_A, Gateway
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
