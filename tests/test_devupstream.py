"""The development upstream, run as `make run` runs it: a real process on a real port."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from aisix import devaudio
from aisix.devaudio import MP3_FRAME
from aisix.devupstream import LABEL, setup_logging, speech_seconds
from tests.gateway import TEAM_A, Gateway

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": "Bearer dev"}


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "aisix.devupstream", "--listen", "127.0.0.1:0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until bound; "" if the process died
        assert line.startswith("devupstream | listening on http://127.0.0.1:"), line
        yield line.split()[-1] + "/v1"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0  # SIGTERM is a clean shutdown
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=AUTH) as s:
        yield s


def audio_form(model: str = "whisper-1", file: bytes = b"RIFF" + bytes(996), **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("model", model)
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("file", file, filename="speech.wav", content_type="audio/wav")
    return form


def test_every_line_it_logs_is_labelled() -> None:
    """`make run` interleaves its lines with the gateway's: a traceback's lines are labelled too."""
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(out)
        try:
            raise ValueError("first line\nsecond line")
        except ValueError:
            logging.getLogger("aiohttp.server").exception("Error handling request")
        logging.getLogger("aiohttp.access").info("GET / 200")  # the gateway logs requests already
    finally:
        root.handlers[:], root.level = saved
    lines = out.getvalue().splitlines()
    assert len(lines) > 4 and all(line.startswith(LABEL) for line in lines), lines
    assert "ERROR aiohttp.server: Error handling request" in lines[0]
    assert lines[-2:] == [LABEL + "ValueError: first line", LABEL + "second line"]
    assert not any("GET / 200" in line for line in lines)


def test_a_taken_port_is_one_labelled_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "aisix.devupstream", "--listen", f"127.0.0.1:{port}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(LABEL) and f"cannot listen on 127.0.0.1:{port}" in line, line


def test_mp3_silence_is_whole_frames() -> None:
    assert len(MP3_FRAME) == 480 and MP3_FRAME[:4] == b"\xff\xf3\xe4\xc4"
    assert devaudio.mp3(0.024) == MP3_FRAME
    assert devaudio.mp3(1.0) == MP3_FRAME * 42  # ceil(1 / 0.024)


@pytest.mark.parametrize(("text", "speed", "seconds"), [
    ("", 1.0, 0.5), ("Hi.", 1.0, 0.5), ("x" * 100, 1.0, 6.0), ("x" * 100, 2.0, 3.0), ("x" * 100, 0.25, 24.0),
    ("x" * 499, 1.0, 29.94), ("x" * 2000, 1.0, 30.0), ("x" * 2000, 4.0, 30.0),
])
def test_speech_lasts_60_ms_a_character_capped(text: str, speed: float, seconds: float) -> None:
    assert speech_seconds(text, speed) == pytest.approx(seconds)


def ffprobe_seconds(path: Path, fmt: str) -> float:
    raw = ["-f", "s16le", "-ar", "24000", "-ac", "1"] if fmt == "pcm" else []  # pcm has no header
    out = subprocess.run(["ffprobe", "-v", "error", *raw, "-show_entries", "format=duration",
                          "-of", "default=noprint_wrappers=1:nokey=1", str(path)],
                         capture_output=True, text=True, check=True, timeout=30)
    return float(out.stdout)


def ffmpeg_complaints(path: Path, fmt: str) -> str:
    """What ffmpeg says decoding the whole file (bad CRCs, broken frames): "" when it is clean."""
    raw = ["-f", "s16le", "-ar", "24000", "-ac", "1"] if fmt == "pcm" else []
    done = subprocess.run(["ffmpeg", "-v", "error", *raw, "-i", str(path), "-f", "null", "-"],
                          capture_output=True, text=True, timeout=30)
    return done.stderr if done.returncode == 0 else f"exit {done.returncode}: {done.stderr}"


# ffprobe's duration of each format's file against the length it was made for: within 1% or 50 ms.
@pytest.mark.parametrize("fmt", sorted(devaudio.FORMATS))
@pytest.mark.parametrize("seconds", [0.5, 7.77, 30.0])
def test_every_format_lasts_as_long_as_intended(fmt: str, seconds: float, tmp_path: Path) -> None:
    _, audio = devaudio.silence(fmt, seconds)
    path = tmp_path / f"silence.{fmt}"
    path.write_bytes(audio)
    assert ffprobe_seconds(path, fmt) == pytest.approx(seconds, abs=max(0.05, seconds / 100))
    assert ffmpeg_complaints(path, fmt) == ""


def test_a_flac_longer_than_127_frames_numbers_them_right(tmp_path: Path) -> None:
    # frame numbers from 128 on take two bytes ("UTF-8" coded); a wrong one is a decode error
    path = tmp_path / "long.flac"
    path.write_bytes(devaudio.flac(200 * 4096 / 24_000 + 0.01))
    assert ffmpeg_complaints(path, "flac") == ""


@pytest.mark.parametrize(("fmt", "content_type", "magic"), [
    ("mp3", "audio/mpeg", b"\xff\xf3"), ("opus", "audio/ogg", b"OggS"), ("aac", "audio/aac", b"\xff\xf1"),
    ("flac", "audio/flac", b"fLaC"), ("wav", "audio/wav", b"RIFF"), ("pcm", "audio/pcm", b"\0\0"),
])
@pytest.mark.parametrize(("text", "speed"), [("Hi.", 1.0), ("Hello from AISIX. " * 4, 1.0),
                                             ("Hello from AISIX. " * 4, 2.0)], ids=["min", "72-chars", "72-chars-speed-2"])
async def test_speech_in_every_format_follows_the_text(base_url: str, session: aiohttp.ClientSession,
                                                       tmp_path: Path, fmt: str, content_type: str,
                                                       magic: bytes, text: str, speed: float) -> None:
    body = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": fmt, "speed": speed}
    async with session.post(f"{base_url}/audio/speech", json=body) as resp:
        assert resp.status == 200 and resp.content_type == content_type
        assert resp.content_length is None  # chunked
        audio, http_chunks = bytearray(), 0
        async for data, end_of_chunk in resp.content.iter_chunks():
            audio += data
            http_chunks += end_of_chunk and bool(data)
    assert http_chunks > 1 and audio.startswith(magic)
    intended = min(30.0, max(0.5, len(text) * 0.060 / speed))
    assert speech_seconds(text, speed) == intended
    path = tmp_path / f"speech.{fmt}"
    path.write_bytes(audio)
    assert ffprobe_seconds(path, fmt) == pytest.approx(intended, abs=max(0.05, intended / 100))


async def test_speech_streams_real_mp3(base_url: str, session: aiohttp.ClientSession,
                                       tmp_path: Path) -> None:
    body = {"model": "tts-1", "input": "Hello from AISIX." * 3, "voice": "alloy"}
    async with session.post(f"{base_url}/audio/speech", json=body) as resp:
        assert resp.status == 200
        assert resp.content_type == "audio/mpeg"
        assert resp.content_length is None  # chunked
        audio, http_chunks = bytearray(), 0
        async for data, end_of_chunk in resp.content.iter_chunks():
            audio += data
            http_chunks += end_of_chunk and bool(data)
    assert http_chunks > 1
    assert len(audio) == len(devaudio.mp3(51 * 0.060))
    out = tmp_path / "out.mp3"
    out.write_bytes(audio)
    file_cmd = shutil.which("file")
    assert file_cmd is not None, "file is one of the tools make test installs (Makefile, SYSTEM_TOOLS)"
    described = subprocess.run([file_cmd, str(out)], capture_output=True, text=True, check=True)
    assert "MPEG ADTS, layer III" in described.stdout


async def test_speech_as_events_carries_the_same_audio_and_its_tokens(base_url: str,
                                                                      session: aiohttp.ClientSession) -> None:
    text = "Hello from AISIX." * 3
    body = {"model": "gpt-4o-mini-tts", "input": text, "voice": "alloy", "response_format": "wav",
            "stream_format": "sse"}
    async with session.post(f"{base_url}/audio/speech", json=body) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        raw = await resp.read()
    events = [json.loads(line[5:]) for line in raw.split(b"\n") if line.startswith(b"data:")]
    assert len(events) > 2 and {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == devaudio.silence("wav", 51 * 0.060)[1]
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["total_tokens"] == events[-1]["usage"]["input_tokens"] + events[-1]["usage"][
        "output_tokens"] > 0


@pytest.mark.parametrize(("headers", "body", "status", "param"), [
    (AUTH, {"model": "tts-1", "voice": "alloy"}, 400, "input"),
    (AUTH, {"model": "tts-1", "input": ""}, 400, "input"),
    (AUTH, {"input": "hi"}, 400, "model"),
    (AUTH, {"model": "tts-1", "input": "hi", "response_format": "ogg"}, 400, "response_format"),
    (AUTH, {"model": "tts-1", "input": "hi", "speed": 4.5}, 400, "speed"),
    (AUTH, {"model": "tts-1", "input": "hi", "speed": "fast"}, 400, "speed"),
    (AUTH, {"model": "tts-1", "input": "hi", "stream_format": "chunks"}, 400, "stream_format"),
    ({"Authorization": ""}, {"model": "tts-1", "input": "hi"}, 401, None),
])
async def test_speech_rejections_are_envelopes(base_url: str, headers: dict[str, str],
                                               body: dict[str, str], status: int,
                                               param: str | None) -> None:
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.post(f"{base_url}/audio/speech", json=body) as resp:
            assert resp.status == status
            error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["type"] == ("authentication_error" if status == 401 else "invalid_request_error")


async def test_transcription_json_has_text_and_token_usage(base_url: str,
                                                           session: aiohttp.ClientSession) -> None:
    form = audio_form("gpt-4o-transcribe")
    async with session.post(f"{base_url}/audio/transcriptions", data=form) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["text"] == "Development transcript of speech.wav (1000 bytes)."
    usage = answer["usage"]
    assert usage["type"] == "tokens"
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0


async def test_whisper_reports_the_seconds_of_its_own_speech(base_url: str,
                                                             session: aiohttp.ClientSession) -> None:
    # the speech this upstream makes, sent back: its length is what the transcription reports
    text = "Hello from AISIX. " * 5
    async with session.post(f"{base_url}/audio/speech", json={"model": "tts-1", "input": text}) as resp:
        mp3 = await resp.read()
    seconds = len(mp3) / 20_000  # 160 kbit/s
    assert seconds == pytest.approx(speech_seconds(text), abs=0.024)
    for fmt in ("json", "verbose_json"):
        async with session.post(f"{base_url}/audio/transcriptions",
                                data=audio_form(file=mp3, response_format=fmt)) as resp:
            answer = await resp.json()
        assert answer["usage"] == {"type": "duration", "seconds": math.ceil(seconds)}
        if fmt == "verbose_json":
            assert answer["duration"] == pytest.approx(seconds, abs=0.01)
            assert answer["segments"][-1]["end"] == answer["duration"]


async def test_the_chain_through_a_gateway_offline(base_url: str, tmp_path: Path) -> None:
    """A gateway in front of the dev upstream: speech measured out (pcm: no probe needed beyond
    the byte count), the transcription's reported seconds in the usage event."""
    gw = Gateway(tmp_path, base_url).start()
    try:
        auth = {"Authorization": f"Bearer {TEAM_A}"}
        async with aiohttp.ClientSession(headers=auth) as s:
            body = {"model": "tts-prod", "input": "x" * 100, "response_format": "pcm"}
            async with s.post(f"{gw.url}/v1/audio/speech", json=body) as resp:
                pcm = await resp.read()
                speech_id = resp.headers["x-aisix-request-id"]
            form = audio_form("whisper-prod", file=devaudio.mp3(6.0), response_format="verbose_json")
            async with s.post(f"{gw.url}/v1/audio/transcriptions", data=form) as resp:
                assert resp.status == 200
                transcript_id = resp.headers["x-aisix-request-id"]
        assert len(pcm) == 2 * 24_000 * 6
        assert gw.event(speech_id)["audio_seconds_out"] == 6.0
        assert gw.event(transcript_id)["audio_seconds"] == 6.0
    finally:
        gw.stop()


async def test_translation_json_is_text_only(base_url: str, session: aiohttp.ClientSession) -> None:
    async with session.post(f"{base_url}/audio/translations", data=audio_form()) as resp:
        assert await resp.json() == {"text": "Development transcript of speech.wav (1000 bytes)."}


async def test_verbose_json_reports_duration(base_url: str, session: aiohttp.ClientSession) -> None:
    form = audio_form(response_format="verbose_json")
    async with session.post(f"{base_url}/audio/transcriptions", data=form) as resp:
        answer = await resp.json()
    assert answer["duration"] > 0 and answer["language"] == "en"
    assert answer["segments"][0]["text"] == answer["text"]
    assert answer["usage"]["type"] == "duration"


@pytest.mark.parametrize(("fmt", "starts"), [
    ("text", "Development transcript"), ("srt", "1\n00:00:00,000 --> "), ("vtt", "WEBVTT\n\n"),
])
async def test_text_formats_are_plain_text(base_url: str, session: aiohttp.ClientSession,
                                           fmt: str, starts: str) -> None:
    form = audio_form(response_format=fmt)
    async with session.post(f"{base_url}/audio/transcriptions", data=form) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    assert text.startswith(starts)
    assert "speech.wav (1000 bytes)" in text


async def test_stream_true_answers_sse_frames(base_url: str,
                                              session: aiohttp.ClientSession) -> None:
    form = audio_form("gpt-4o-transcribe", stream="true")
    async with session.post(f"{base_url}/audio/transcriptions", data=form) as resp:
        assert resp.content_type == "text/event-stream"
        raw = (await resp.read()).decode()
    frames = raw.split("\n\n")
    assert frames.pop() == ""
    events = [json.loads(frame.removeprefix("data: ")) for frame in frames]
    *deltas, done = events
    assert {event["type"] for event in deltas} == {"transcript.text.delta"}
    assert "".join(event["delta"] for event in deltas).strip() == done["text"]
    assert done["type"] == "transcript.text.done"
    assert done["usage"]["type"] == "tokens"


@pytest.mark.parametrize(("fields", "param"), [({"model": "whisper-1"}, "file"),
                                               ({"prompt": "x"}, "model")])
async def test_missing_part_is_400_envelope(base_url: str, session: aiohttp.ClientSession,
                                            fields: dict[str, str], param: str) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        form.add_field(name, value)
    if param != "file":
        form.add_field("file", b"abc", filename="a.wav")
    async with session.post(f"{base_url}/audio/transcriptions", data=form) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


async def _next(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict:
    """The next event of this type (deltas before it skipped)."""
    while True:
        event = json.loads((await ws.receive_str(timeout=10)))
        if event["type"] == kind:
            return event
        assert event["type"] == "response.output_audio.delta", event


async def test_realtime_responses_run_and_can_be_cancelled(base_url: str, session: aiohttp.ClientSession) -> None:
    # As the Realtime API answers: created, audio deltas, done with the usage of what was made;
    # a cancel ends one under way with what it had sent, and is an error when none is.
    url = base_url.replace("http://", "ws://") + "/realtime?model=gpt-realtime"
    async with session.ws_connect(url, headers=AUTH, protocols=("realtime",)) as ws:
        assert (await _next(ws, "session.created"))["session"]["model"] == "gpt-realtime"
        await ws.send_json({"type": "response.create"})
        rid = (await _next(ws, "response.created"))["response"]["id"]
        done = (await _next(ws, "response.done"))["response"]
        assert (done["id"], done["status"], done["usage"]["output_tokens"]) == (rid, "completed", 250)
        await ws.send_json({"type": "response.create"})
        rid = (await _next(ws, "response.created"))["response"]["id"]
        await _next(ws, "response.output_audio.delta")  # under way
        await ws.send_json({"type": "response.cancel", "response_id": rid})
        done = (await _next(ws, "response.done"))["response"]
        assert (done["id"], done["status"]) == (rid, "cancelled") and done["usage"]["output_tokens"] < 250
        await ws.send_json({"type": "response.cancel"})
        error = json.loads(await ws.receive_str(timeout=10))
        assert (error["type"], error["error"]["code"]) == ("error", "response_cancel_not_active")
