"""Transcriptions and translations: the upstream gets the caller's body with only the model swapped."""

from __future__ import annotations

import json
import os
import time

import aiohttp
import pytest

from tests.fakes import Behaviour, FakeUpstream
from tests.gateway import TEAM_A, Gateway

AUTH = {"Authorization": f"Bearer {TEAM_A}"}
BOUNDARY = "----aisixE2Eboundary0123456789"
AUDIO = os.urandom(200_000) + b"\r\n--" + BOUNDARY.encode()[:-1] + b"\r\n"  # ends boundary-like
EXTRA = [("response_format", b"json"), ("timestamp_granularities[]", b"word"),
         ("timestamp_granularities[]", b"segment"), ("include[]", b"logprobs"),
         ("chunking_strategy[type]", b"server_vad"), ("language", b"en")]


def form(*order: str | tuple[str, bytes], model: bytes = b"whisper-prod", file: bytes = AUDIO,
         file_name: bytes = b"speech.wav", fields: list[tuple[str, bytes]] | None = None) -> tuple[bytes, str]:
    """A multipart body with its parts in the given order ("model", "file" or a (name, value)
    field), then `fields`; and its Content-Type."""
    out = bytearray()
    for name in order:
        if isinstance(name, tuple):
            out += b"--" + BOUNDARY.encode() + b'\r\nContent-Disposition: form-data; name="' + name[0].encode()
            out += b'"\r\n\r\n' + name[1] + b"\r\n"
            continue
        out += b"--" + BOUNDARY.encode() + b"\r\n"
        if name == "file":
            out += b'Content-Disposition: form-data; name="file"; filename="' + file_name + b'"\r\n'
            out += b"Content-Type: audio/wav\r\n\r\n" + file + b"\r\n"
        else:
            out += b'Content-Disposition: form-data; name="model"\r\n\r\n' + model + b"\r\n"
    for name, value in fields or []:
        out += b"--" + BOUNDARY.encode() + b'\r\nContent-Disposition: form-data; name="' + name.encode()
        out += b'"\r\n\r\n' + value + b"\r\n"
    out += b"--" + BOUNDARY.encode() + b"--\r\n"
    return bytes(out), f"multipart/form-data; boundary={BOUNDARY}"


def swapped(body: bytes, old: bytes = b"whisper-prod", new: bytes = b"whisper-1") -> bytes:
    marker = b'name="model"\r\n\r\n'
    assert body.count(marker + old) == 1
    return body.replace(marker + old, marker + new)


async def chunked(data: bytes, size: int = 7919):
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.parametrize("route", ["transcriptions", "translations"])
@pytest.mark.parametrize("order", [("model", "file"), ("file", "model")], ids=["model-first", "file-first"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_upstream_body_is_the_callers_with_only_the_model_swapped(
        gateway: Gateway, fake: FakeUpstream, route: str, order: tuple[str, str], framing: str) -> None:
    body, ctype = form(*order, fields=EXTRA)
    data = body if framing == "content-length" else chunked(body)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gateway.url}/v1/audio/{route}", data=data,
                          headers={**AUTH, "Content-Type": ctype}) as r:
            answer = await r.json()
            assert r.status == 200, answer
    got = fake.wait_received()[0]
    assert got.path == f"/v1/audio/{route}"
    assert got.complete
    assert got.body == swapped(body)
    assert got.headers["Content-Type"] == ctype
    if framing == "content-length":
        assert got.headers["Content-Length"] == str(len(body) - len(b"whisper-prod") + len(b"whisper-1"))
        assert "Transfer-Encoding" not in got.headers
    else:
        assert got.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in got.headers
    assert answer["text"] == "hello from the fake"


@pytest.mark.parametrize("fmt, ctype", [("json", "application/json"), ("text", "text/plain"),
                                        ("srt", "text/plain"), ("vtt", "text/plain")])
async def test_answer_content_type_is_kept(gateway: Gateway, fake: FakeUpstream, fmt: str, ctype: str) -> None:
    body, form_type = form("model", "file", fields=[("response_format", fmt.encode())])
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/audio/transcriptions", data=body,
                          headers={**AUTH, "Content-Type": form_type}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].split(";")[0] == ctype
            assert "hello from the fake" in await r.text()


async def test_sse_frames_are_relayed_as_they_arrive(gateway: Gateway, fake: FakeUpstream) -> None:
    fake.behaviour = Behaviour(chunk_delay=0.25, transcript="one two three four")
    body, ctype = form("model", "file", fields=[("stream", b"true")])
    arrivals: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/audio/transcriptions", data=body,
                          headers={**AUTH, "Content-Type": ctype}) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for chunk in r.content.iter_any():
                arrivals.append((time.monotonic(), chunk))
    frames = b"".join(c for _, c in arrivals).split(b"\n\n")
    events = [json.loads(f.removeprefix(b"data: ")) for f in frames if f.strip()]
    assert [e["type"] for e in events] == ["transcript.text.delta"] * 4 + ["transcript.text.done"]
    assert arrivals[0][0] < fake.sent_at[-1], "the first frame waited for the last"


async def no_complete_request_reached(gateway: Gateway, fake: FakeUpstream) -> None:
    """The upstream got no complete request before a follow-up one: it may have got a cut one, or
    nothing at all (the gateway can fail the body before any byte leaves). The aborted upstream
    connection is closed before the caller gets its answer, so the follow-up comes after it."""
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/audio/speech", headers=AUTH,
                          json={"model": "tts-prod", "input": "sentinel", "voice": "alloy"}) as r:
            assert r.status == 200
            await r.read()
    received = fake.wait_received()
    while received[-1].path != "/v1/audio/speech":
        received = fake.wait_received(len(received) + 1)
    assert [r.complete for r in received[:-1]] == [False] * (len(received) - 1)


async def test_missing_file_after_streaming_started_aborts_the_upstream(gateway: Gateway, fake: FakeUpstream) -> None:
    # Bytes after the model, so the upstream request is under way when the file is found missing.
    body, ctype = form("model", fields=[("prompt", b"p" * 300_000)])
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/audio/transcriptions", data=chunked(body),
                          headers={**AUTH, "Content-Type": ctype}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "missing_file"
    await no_complete_request_reached(gateway, fake)


async def test_truncated_body_never_reaches_the_upstream_complete(gateway: Gateway, fake: FakeUpstream) -> None:
    body, ctype = form("model", "file")
    cut = body[: len(body) - 30]  # stops inside the closing delimiter; the caller ends cleanly
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/audio/transcriptions", data=chunked(cut),
                          headers={**AUTH, "Content-Type": ctype}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "invalid_multipart"
    await no_complete_request_reached(gateway, fake)


async def test_an_early_upstream_answer_is_relayed(gateway: Gateway, fake: FakeUpstream) -> None:
    fake.behaviour = Behaviour(status=400, read_body=False)
    body, ctype = form("model", "file", file=os.urandom(900_000))
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/audio/transcriptions", data=body,
                          headers={**AUTH, "Content-Type": ctype}) as r:
            assert r.status == 400
            assert r.headers["x-upstream-request-id"] == "req_fake"


@pytest.mark.parametrize("alias", ["whisper-prod", "no-such-alias"])
async def test_a_form_without_a_file_still_records_the_alias_it_sent(gateway: Gateway, alias: str) -> None:
    """A small form whose `model` part came but no `file` (curl -F model=... alone, one chunk): the
    caller gets 400 missing_file, and the usage event and access line name the alias it sent
    (`model` is recorded "once the alias was read"), so errors can be
    summed per alias (`aisix usage --by model`)."""
    boundary = "aliasonlyboundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{alias}\r\n'
            f'--{boundary}--\r\n').encode()
    async with aiohttp.ClientSession() as s, s.post(gateway.url + "/v1/audio/transcriptions", data=body, headers={
            "Authorization": f"Bearer {TEAM_A}", "Content-Type": f"multipart/form-data; boundary={boundary}"}) as r:
        answer = await r.json()
        rid = r.headers["x-aisix-request-id"]
    assert (r.status, answer["error"]["code"]) == (400, "missing_file")
    event = gateway.event(rid)
    assert event.get("model") == alias, event
    assert f"model={alias} " in gateway.wait_log(f"rid={rid}")


def _stream_form() -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("model", "whisper-prod")
    form.add_field("stream", "true")
    form.add_field("file", b"ID3" + bytes(2000), filename="a.mp3", content_type="audio/mpeg")
    return form


async def test_a_streamed_transcription_over_1_mib_records_its_tokens(gateway: Gateway, fake: FakeUpstream) -> None:
    # A long file transcribed with stream=true (gpt-4o-transcribe, and include[]=logprobs makes
    # each delta larger): its tokens come in transcript.text.done after over 1 MiB of deltas. They
    # were dropped from the usage event, so a token price cost nothing and tpm took nothing.
    fake.behaviour = Behaviour(transcript=" ".join(f"word{i}" for i in range(20_000)))
    async with aiohttp.ClientSession() as s, s.post(gateway.url + "/v1/audio/transcriptions", headers={
            "Authorization": f"Bearer {TEAM_A}"}, data=_stream_form()) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        body = await r.read()
        event = gateway.event(r.headers["x-aisix-request-id"])
    assert len(body) > 1024 * 1024
    assert event["bytes_out"] == len(body) and event["stream"] is True
    assert (event["input_tokens"], event["output_tokens"], event["total_tokens"]) == (10, 5, 15)


async def test_an_upstream_refusals_retry_hints_reach_the_caller(gateway: Gateway, fake: FakeUpstream) -> None:
    # OpenAI's SDKs read retry-after-ms (before Retry-After) and x-should-retry; only Retry-After
    # was relayed, so an upstream's "do not retry" was lost and the SDK retried anyway.
    fake.behaviour = Behaviour(status=429, error_headers={
        "Retry-After": "7", "retry-after-ms": "6500", "x-should-retry": "false",
        "x-ratelimit-remaining-requests": "0"})
    data, ctype = form("model", "file")
    async with aiohttp.ClientSession() as s, s.post(gateway.url + "/v1/audio/transcriptions", data=data, headers={
            "Authorization": f"Bearer {TEAM_A}", "Content-Type": ctype}) as r:
        assert r.status == 429
        assert (r.headers["Retry-After"], r.headers["retry-after-ms"], r.headers["x-should-retry"]) == (
            "7", "6500", "false")
        assert "x-ratelimit-remaining-requests" not in r.headers  # the gateway's own, when it has them
