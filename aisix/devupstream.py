"""A dev OpenAI audio upstream for `make run`: real silent audio, canned transcripts, no model.

Speech answers are real silence in the asked `response_format` (mp3, opus, aac, flac, wav, pcm;
aisix/devaudio.py makes them in Python), as long as the input text would take to say (60 ms a
character, 0.5 to 30 s, divided by `speed`), streamed in chunks the way a TTS provider streams, or
as events with `stream_format: "sse"` (base64 pieces, then the tokens).
Transcriptions and translations never decode the upload: the text names the file and its size,
and the duration they report is the upload's as the gateway's own probes read it
(aisix/audio_detect.py), else its size at this upstream's MP3 bit rate, so the speech it made
comes back with its own length. Realtime sessions (`/v1/realtime`) answer committed audio with a
transcript naming how much came. Nothing here is meant for production or for load.

Every line it writes starts with ``devupstream | ``, each line of a traceback included: `make run`
shows it in one terminal with the gateway's log and usage lines.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import logging
import math
import signal
import sys
from typing import Any, TextIO

from aiohttp import BodyPartReader, WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError

from . import devaudio
from .audio_detect import Detect
from .devaudio import MP3_FRAME as MP3_FRAME  # the silent frame the tests' fake upstream streams too
from .logs import FORMAT

LABEL = "devupstream | "
log = logging.getLogger("aisix.devupstream")

SECONDS_PER_CHARACTER = 0.060
MIN_SECONDS, MAX_SECONDS = 0.5, 30.0
MIN_SPEED, MAX_SPEED = 0.25, 4.0  # OpenAI's range for `speed`
CHUNK_SECONDS = 0.24  # audio per streamed chunk (ten MP3 frames), whatever the format's bytes
CHUNK_PAUSE = 0.02  # seconds between chunks, so clients see a stream, not one write
# An upload no probe can time is taken to be this upstream's own MP3 (160 kbit/s): speech it made,
# sent back for a transcript, then reports the length it was made with. Anything else is a guess.
ASSUMED_UPLOAD_BYTES_PER_SECOND = 20_000
TEXT_FORMATS = {"text", "srt", "vtt"}
FORMATS = {"json", "verbose_json"} | TEXT_FORMATS


def speech_seconds(text: str, speed: float = 1.0) -> float:
    """How long the answer to `text` lasts: 60 ms a character at speed 1, within 0.5 to 30 s."""
    return min(MAX_SECONDS, max(MIN_SECONDS, len(text) * SECONDS_PER_CHARACTER / speed))


def chunks(audio: bytes, seconds: float) -> list[bytes]:
    """The answer in about CHUNK_SECONDS of audio each (at least two, so it is seen streaming)."""
    count = max(2, math.ceil(seconds / CHUNK_SECONDS))
    step = max(1, math.ceil(len(audio) / count))
    return [audio[offset:offset + step] for offset in range(0, len(audio), step)]


def envelope(status: int, message: str, param: str | None = None, code: str | None = None,
             kind: str = "invalid_request_error") -> web.Response:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return web.json_response({"error": error}, status=status)


def unauthorised(request: web.Request) -> web.Response | None:
    if request.headers.get("Authorization", "").startswith("Bearer "):
        return None
    return envelope(401, "Missing bearer token in the Authorization header.",
                    code="invalid_api_key", kind="authentication_error")


async def speech(request: web.Request) -> web.StreamResponse:
    if (denied := unauthorised(request)) is not None:
        return denied
    try:
        body = await request.json()
    except ValueError:
        return envelope(400, "The body is not valid JSON.", code="invalid_json")
    if not isinstance(body, dict):
        return envelope(400, "The body must be a JSON object.", code="invalid_json")
    for field in ("model", "input"):
        if not isinstance(body.get(field), str) or not body[field]:
            return envelope(400, f"Missing required parameter: '{field}'.", param=field)
    fmt = body.get("response_format", "mp3")
    if fmt not in devaudio.FORMATS:
        return envelope(400, f"Invalid response_format {fmt!r}: one of {', '.join(devaudio.FORMATS)}.",
                        param="response_format")
    speed = body.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not MIN_SPEED <= speed <= MAX_SPEED:
        return envelope(400, f"speed must be a number from {MIN_SPEED} to {MAX_SPEED}.", param="speed")

    stream_format = body.get("stream_format", "audio")
    if stream_format not in ("audio", "sse"):
        return envelope(400, f"Invalid stream_format {stream_format!r}: audio or sse.", param="stream_format")
    seconds = speech_seconds(body["input"], speed)
    content_type, audio = devaudio.silence(fmt, seconds)
    if stream_format == "sse":
        return await speech_events(request, audio, seconds, body["input"])
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for index, chunk in enumerate(chunks(audio, seconds)):
        if index:
            await asyncio.sleep(CHUNK_PAUSE)
        await response.write(chunk)
    await response.write_eof()
    return response


async def speech_events(request: web.Request, audio: bytes, seconds: float, text: str) -> web.StreamResponse:
    """stream_format "sse": the audio in base64 pieces (speech.audio.delta), then the usage
    (speech.audio.done; tokens as gpt-4o-mini-tts counts them, roughly: a token per four characters
    in, about 21 audio tokens a second out)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for index, chunk in enumerate(chunks(audio, seconds)):
        if index:
            await asyncio.sleep(CHUNK_PAUSE)
        event = {"type": "speech.audio.delta", "audio": base64.b64encode(chunk).decode("ascii")}
        await response.write(f"data: {json.dumps(event)}\n\n".encode())
    tokens_in, tokens_out = max(1, len(text) // 4), max(1, round(seconds * 21))
    done = {"type": "speech.audio.done", "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out,
                                                   "total_tokens": tokens_in + tokens_out}}
    await response.write(f"data: {json.dumps(done)}\n\n".encode())
    await response.write_eof()
    return response


def timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    return f"{hours:02}:{minutes:02}:{millis // 1000:02}{separator}{millis % 1000:03}"


def token_usage(audio_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"type": "tokens", "input_tokens": audio_tokens,
            "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
            "output_tokens": output_tokens, "total_tokens": audio_tokens + output_tokens}


async def read_form(request: web.Request) -> tuple[dict[str, str], str | None, int, float]:
    """Field values, the file's name (None when no file part came), its size in bytes and its
    duration in seconds (measured where a probe can, else from its size)."""
    fields: dict[str, str] = {}
    filename, size, probe = None, 0, Detect()
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):  # a nested multipart: not a form field
            continue
        if part.name == "file":
            filename = part.filename or "upload"
            while chunk := await part.read_chunk():
                size += len(chunk)
                probe.feed(chunk)
        elif part.name:
            fields[part.name] = await part.text()
    measured = probe.end() if filename is not None else None
    seconds = measured if measured is not None else size / ASSUMED_UPLOAD_BYTES_PER_SECOND
    return fields, filename, size, round(max(0.1, seconds), 2)


async def transcribe(request: web.Request, route: str) -> web.StreamResponse:
    if (denied := unauthorised(request)) is not None:
        return denied
    try:
        fields, filename, size, seconds = await read_form(request)
    except (ValueError, KeyError, AssertionError, RuntimeError, HttpProcessingError) as exc:
        return envelope(400, f"Could not parse the multipart body: {exc}", code="invalid_multipart")
    if filename is None:
        return envelope(400, "Missing required parameter: 'file'.", param="file")
    if not fields.get("model"):
        return envelope(400, "Missing required parameter: 'model'.", param="model")
    fmt = fields.get("response_format", "json")
    if fmt not in FORMATS:
        return envelope(400, f"Unsupported response_format '{fmt}'.", param="response_format")

    text = f"Development transcript of {filename} ({size} bytes)."
    words = text.split(" ")
    # whisper-1 reports the seconds it heard, the gpt-4o transcribe models tokens (as OpenAI does)
    usage = ({"type": "duration", "seconds": math.ceil(seconds)} if fields["model"].startswith("whisper")
             else token_usage(max(1, size // 1000), len(words)))
    if route == "transcriptions" and fields.get("stream", "").lower() == "true":
        return await stream_transcript(request, words, usage)
    if fmt == "text":
        return web.Response(text=text + "\n")
    if fmt in ("srt", "vtt"):
        sep = "," if fmt == "srt" else "."
        cue = f"{timestamp(0, sep)} --> {timestamp(seconds, sep)}\n{text}\n"
        return web.Response(text=f"1\n{cue}\n" if fmt == "srt" else f"WEBVTT\n\n{cue}\n")
    answer: dict[str, Any] = {"text": text}
    if fmt == "verbose_json":
        language = "english" if route == "translations" else "en"
        task = "transcribe" if route == "transcriptions" else "translate"
        answer = {"task": task, "language": language,
                  "duration": seconds, "text": text,
                  "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": seconds, "text": text}]}
        if route == "transcriptions":
            answer["usage"] = {"type": "duration", "seconds": math.ceil(seconds)}
    elif route == "transcriptions":
        answer["usage"] = usage
    return web.json_response(answer)


async def stream_transcript(request: web.Request, words: list[str],
                            usage: dict[str, Any]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    events: list[dict[str, Any]] = [{"type": "transcript.text.delta", "delta": word + " "} for word in words]
    events.append({"type": "transcript.text.done", "text": " ".join(words), "usage": usage})
    for index, event in enumerate(events):
        if index:
            await asyncio.sleep(CHUNK_PAUSE)
        await response.write(f"data: {json.dumps(event)}\n\n".encode())
    await response.write_eof()
    return response


async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await transcribe(request, "transcriptions")


async def translations(request: web.Request) -> web.StreamResponse:
    return await transcribe(request, "translations")


PCM_BYTES_PER_SECOND = 24_000 * 2  # the Realtime API's default input: 24 kHz 16-bit mono PCM
_ids = itertools.count(1)


def _event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "event_id": f"event_dev_{next(_ids)}", **fields}


RESPONSE_DELTAS = 25  # a response's audio: this many pieces of 20 ms silence, CHUNK_PAUSE apart (0.5 s)


async def realtime(request: web.Request) -> web.StreamResponse:
    """A Realtime API session that transcribes nothing: audio appended and committed is answered
    with the transcription events of a canned transcript naming how much audio came. A
    ``response.create`` is answered as the API does: ``response.created``, audio deltas of
    silence, then ``response.done`` with usage for what was generated; ``response.cancel`` ends
    one under way (``status: "cancelled"``, the usage of the deltas sent), or is an ``error``
    when none is."""
    if (denied := unauthorised(request)) is not None:
        return denied
    ws = web.WebSocketResponse(protocols=("realtime",))
    await ws.prepare(request)
    intent = request.query.get("intent")
    model = request.query.get("model")
    kind = "transcription_session" if intent == "transcription" and model is None else "session"
    session: dict[str, Any] = {"id": f"sess_dev_{next(_ids)}", "model": model, "type": intent or "realtime"}
    await ws.send_json(_event(f"{kind}.created", session=session))
    audio = 0
    responses: dict[str, asyncio.Task[None]] = {}  # under way, by id
    async for msg in ws:
        if msg.type is not WSMsgType.TEXT:
            continue
        try:
            event = json.loads(msg.data)
        except ValueError:
            await ws.send_json(_event("error", error={"type": "invalid_request_error", "code": "invalid_json",
                                                      "message": "The frame is not JSON."}))
            continue
        kind_in = event.get("type") if isinstance(event, dict) else None
        if kind_in in ("session.update", "transcription_session.update"):
            session.update(event.get("session") or {})
            await ws.send_json(_event(kind_in.replace("update", "updated"), session=session))
        elif kind_in == "input_audio_buffer.append":
            with contextlib.suppress(binascii.Error, TypeError):  # bad base64 counts as nothing
                audio += len(base64.b64decode(event.get("audio", ""), validate=True))
        elif kind_in == "input_audio_buffer.commit":
            await _transcribe(ws, audio)
            audio = 0
        elif kind_in == "response.create":
            rid = f"resp_dev_{next(_ids)}"
            await ws.send_json(_event("response.created", response={"id": rid, "status": "in_progress"}))
            responses[rid] = asyncio.create_task(_respond(ws, rid, responses))
        elif kind_in == "response.cancel":
            wanted = event.get("response_id") or next(iter(responses), None)
            running = responses.get(wanted) if isinstance(wanted, str) else None
            if running is None:
                await ws.send_json(_event("error", error={
                    "type": "invalid_request_error", "code": "response_cancel_not_active",
                    "message": "Cancellation failed: no active response found", "param": None,
                    "event_id": event.get("event_id")}))
            else:
                running.cancel()
    for running in list(responses.values()):  # the caller went: nobody hears the rest
        running.cancel()
    return ws


async def _respond(ws: web.WebSocketResponse, rid: str, responses: dict[str, asyncio.Task[None]]) -> None:
    """A response of RESPONSE_DELTAS pieces of 20 ms of silence, 10 output tokens each (as audio
    tokens go), and its response.done; cut short by a cancel, it is done with what was sent."""
    piece = base64.b64encode(bytes(PCM_BYTES_PER_SECOND // 50)).decode()
    sent, status = 0, "completed"
    try:
        for _ in range(RESPONSE_DELTAS):
            await ws.send_json(_event("response.output_audio.delta", response_id=rid, item_id=f"item_{rid}",
                                      output_index=0, content_index=0, delta=piece))
            sent += 1
            await asyncio.sleep(CHUNK_PAUSE)
    except asyncio.CancelledError:
        status = "cancelled"
    finally:
        responses.pop(rid, None)
    if not ws.closed:
        with contextlib.suppress(ConnectionError):
            await ws.send_json(_event("response.done", response={
                "id": rid, "status": status, "output": [],
                "usage": {"total_tokens": 10 + 10 * sent, "input_tokens": 10, "output_tokens": 10 * sent}}))


async def _transcribe(ws: web.WebSocketResponse, audio: int) -> None:
    item = f"item_dev_{next(_ids)}"
    seconds = audio / PCM_BYTES_PER_SECOND
    text = f"Development transcript of {audio} bytes of audio ({seconds:.2f} s)."
    await ws.send_json(_event("input_audio_buffer.committed", item_id=item, previous_item_id=None))
    for word in text.split(" "):
        await ws.send_json(_event("conversation.item.input_audio_transcription.delta", item_id=item,
                                  content_index=0, delta=word + " "))
        await asyncio.sleep(CHUNK_PAUSE)
    usage = token_usage(max(1, round(seconds * 10)), len(text.split(" ")))
    await ws.send_json(_event("conversation.item.input_audio_transcription.completed", item_id=item,
                              content_index=0, transcript=text, usage=usage))


@web.middleware
async def envelopes(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unknown paths and wrong methods answer an OpenAI envelope too, as the real API does."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return envelope(exc.status, exc.reason)


def create_app() -> web.Application:
    app = web.Application(middlewares=[envelopes])
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    app.router.add_post("/v1/audio/translations", translations)
    app.router.add_get("/v1/realtime", realtime)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(create_app(), shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_host, bound_port = runner.addresses[0][:2]
        print(f"{LABEL}listening on http://{bound_host}:{bound_port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


class LabelledFormatter(logging.Formatter):
    """Records with LABEL at the start of every line, so a traceback cannot pass for the gateway's."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(LABEL + line for line in super().format(record).splitlines())


def setup_logging(stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(LabelledFormatter(FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    # The gateway writes one access line per request already; this one's would double them.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aisix.devupstream", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:3001", help="HOST:PORT (port 0 = any)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--listen wants HOST:PORT, got {args.listen!r}")
    setup_logging()
    try:
        asyncio.run(serve(host.strip("[]"), int(port)))
    except OSError as exc:  # the port is taken, most likely: say so, in one labelled line
        log.error("cannot listen on %s: %s", args.listen, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
