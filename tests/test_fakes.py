"""The fake upstream itself: it records exact bytes and each failure looks like one to a client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import aiohttp
import pytest

from aisix.devupstream import MP3_FRAME
from tests.fakes import Behaviour, FakeUpstream

BOUNDARY = "fakeboundary"
BODY = (
    f"--{BOUNDARY}\r\n"
    'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
    "Content-Type: audio/wav\r\n\r\n"
).encode() + bytes(range(256)) * 40 + (
    f"\r\n--{BOUNDARY}\r\n"
    'Content-Disposition: form-data; name="model"\r\n\r\n'
    "whisper-1\r\n"
    f"--{BOUNDARY}\r\n"
    'Content-Disposition: form-data; name="stream"\r\n\r\n'
    "STREAM\r\n"
    f"--{BOUNDARY}--\r\n"
).encode()
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def form(stream: str = "false") -> bytes:
    return BODY.replace(b"STREAM", stream.encode())


@pytest.fixture(scope="module")
def module_fake() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(module_fake: FakeUpstream) -> FakeUpstream:
    module_fake.reset()
    return module_fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


async def pieces(body: bytes, size: int) -> AsyncIterator[bytes]:
    for offset in range(0, len(body), size):
        yield body[offset:offset + size]
        await asyncio.sleep(0.001)


async def test_records_exact_bytes_and_headers(fake: FakeUpstream,
                                               session: aiohttp.ClientSession) -> None:
    headers = MULTIPART | {"X-Probe": "1"}
    async with session.post(f"{fake.base_url}/audio/transcriptions",
                            data=pieces(form(), 1000), headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["x-request-id"] == "req_fake"
        assert await resp.json() == {"text": "hello from the fake", "usage": {
            "type": "tokens", "input_tokens": 10, "output_tokens": 5, "total_tokens": 15}}
    [got] = fake.wait_received(1)
    assert got.body == form()
    assert got.complete and got.chunks_in >= 1
    assert (got.method, got.path) == ("POST", "/v1/audio/transcriptions")
    assert got.headers["x-probe"] == "1"
    assert got.headers["Transfer-Encoding"] == "chunked"


async def test_speech_chunks_as_told(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.behaviour = Behaviour(speech_chunks=4, speech_chunk_bytes=1000, chunk_delay=0.02)
    async with session.post(f"{fake.base_url}/audio/speech", json={"input": "hi"}) as resp:
        assert resp.content_type == "audio/mpeg"
        assert resp.content_length is None
        chunks, pending = [], b""
        async for data, end_of_http_chunk in resp.content.iter_chunks():
            pending += data
            if end_of_http_chunk and pending:  # the last-chunk marker may come as (b"", True)
                chunks.append(pending)
                pending = b""
    audio = b"".join(chunks)
    assert audio == ((MP3_FRAME * 3)[:1000]) * 4
    assert len(chunks) == 4
    assert len(fake.sent_at) == 4
    assert fake.sent_at[-1] - fake.sent_at[0] >= 3 * 0.02 * 0.9


async def test_speech_content_length(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.behaviour = Behaviour(content_length=True)
    async with session.post(f"{fake.base_url}/audio/speech", json={"input": "hi"}) as resp:
        assert resp.content_length == 3 * 4800
        assert len(await resp.read()) == 3 * 4800


async def test_error_status_is_envelope(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.behaviour = Behaviour(status=429)
    async with session.post(f"{fake.base_url}/audio/speech", json={"input": "hi"}) as resp:
        assert resp.status == 429
        assert resp.headers["x-request-id"] == "req_fake"
        assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}


async def test_stream_true_is_sse(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.behaviour = Behaviour(transcript="one two three")
    async with session.post(f"{fake.base_url}/audio/transcriptions", data=form("true"),
                            headers=MULTIPART) as resp:
        assert resp.content_type == "text/event-stream"
        raw = await resp.read()
    events = [json.loads(frame.removeprefix(b"data: ")) for frame in raw.split(b"\n\n")[:-1]]
    assert [event.get("delta") for event in events[:-1]] == ["one ", "two ", "three "]
    assert events[-1]["type"] == "transcript.text.done"
    assert events[-1]["usage"]["total_tokens"] == 15
    assert len(fake.sent_at) == 4


async def test_text_format_is_plain(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    body = form().replace(b'name="stream"', b'name="response_format"').replace(b"\r\nfalse",
                                                                                b"\r\nsrt")
    async with session.post(f"{fake.base_url}/audio/translations", data=body,
                            headers=MULTIPART) as resp:
        assert resp.content_type == "text/plain"
        assert await resp.text() == "hello from the fake\n"


async def test_cut_upload_is_recorded_incomplete(fake: FakeUpstream) -> None:
    url = urlsplit(fake.base_url)
    _, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: 1000\r\n\r\n" + b"a" * 100)
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    [got] = await asyncio.to_thread(fake.wait_received, 1)
    assert not got.complete
    assert got.body == b"a" * 100


async def test_keep_body_false_counts_bytes_only(fake: FakeUpstream,
                                                  session: aiohttp.ClientSession) -> None:
    fake.behaviour = Behaviour(keep_body=False)
    big = form().replace(bytes(range(256)) * 40, bytes(range(256)) * 4000)  # ~1 MiB file
    big = big.replace(b'name="stream"', b'name="response_format"').replace(b"\r\nfalse",
                                                                            b"\r\ntext")
    async with session.post(f"{fake.base_url}/audio/transcriptions", data=pieces(big, 65536),
                            headers=MULTIPART) as resp:
        assert resp.content_type == "text/plain"  # found after the file, in the kept tail
    [got] = fake.wait_received(1)
    assert (got.body, got.size, got.complete) == (b"", len(big), True)


async def test_reset_drops_chunk_times_of_earlier_answers(fake: FakeUpstream,
                                                          session: aiohttp.ClientSession) -> None:
    """A test that resets the fake sees nothing from an answer the previous test left running."""
    fake.behaviour = Behaviour(chunk_delay=0.02)
    async with session.post(f"{fake.base_url}/audio/speech", json={}) as resp:
        assert await resp.content.readany()  # its handler has started
        fake.reset()
        await resp.read()
    assert fake.sent_at == []


async def test_early_answer_without_reading(fake: FakeUpstream,
                                            session: aiohttp.ClientSession) -> None:
    fake.behaviour = Behaviour(read_body=False, status=400)
    async with session.post(f"{fake.base_url}/audio/transcriptions", data=form(),
                            headers=MULTIPART) as resp:
        assert resp.status == 400
    [got] = fake.wait_received(1)
    assert (got.body, got.complete) == (b"", False)


@pytest.mark.parametrize("route", ["speech", "transcriptions"])
@pytest.mark.parametrize("fail", ["reset_before", "garbage", "stall_headers"])
async def test_fails_before_the_answer(fake: FakeUpstream, session: aiohttp.ClientSession,
                                       route: str, fail: str) -> None:
    fake.behaviour = Behaviour(fail=fail)
    timeout = aiohttp.ClientTimeout(total=0.5)
    with pytest.raises((aiohttp.ClientError, asyncio.TimeoutError)) as caught:
        async with session.post(f"{fake.base_url}/audio/{route}", data=form(),
                                headers=MULTIPART, timeout=timeout) as resp:
            await resp.read()
    if fail == "stall_headers":
        assert issubclass(caught.type, asyncio.TimeoutError)
    else:
        assert issubclass(caught.type, aiohttp.ClientError)
    assert fake.wait_received(1)[0].complete


@pytest.mark.parametrize("route", ["speech", "transcriptions"])
@pytest.mark.parametrize("content_length", [False, True])
@pytest.mark.parametrize("fail", ["reset_mid", "stall"])
async def test_fails_after_the_answer_started(fake: FakeUpstream,
                                              session: aiohttp.ClientSession, route: str,
                                              content_length: bool, fail: str) -> None:
    fake.behaviour = Behaviour(fail=fail, content_length=content_length)
    async with session.post(f"{fake.base_url}/audio/{route}", data=form(),
                            headers=MULTIPART) as resp:
        assert resp.status == 200
        assert await resp.content.readany()  # the first chunk arrives
        if fail == "reset_mid":
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        else:
            with pytest.raises(asyncio.TimeoutError):
                async with asyncio.timeout(0.3):
                    await resp.read()
    assert len(fake.sent_at) == 1
    assert fake.wait_received(1)[0].complete


async def test_stop_ends_stalled_answers() -> None:
    fake = FakeUpstream()
    fake.start()
    try:
        fake.behaviour = Behaviour(fail="stall")
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{fake.base_url}/audio/speech", json={}) as resp:
                assert await resp.content.readany()
                await asyncio.to_thread(fake.stop)  # returns although the answer is stalled
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
    finally:
        fake.stop()
    assert fake._thread is None
