"""An upstream answer to the caller, chunk by chunk as it arrives, with the headers docs/api.md names.

Memory per request is one chunk, plus at most 1 MiB of a transcript read for its usage. A failure
after the caller has the status line aborts the caller's connection: a chunked answer is never
terminated and a Content-Length answer never completed, so no client can take a cut-short answer
for a complete one. When an output guardrail can block, a transcript is held and checked before
any of it is released (streaming gives way to the check for those requests only).
"""

from __future__ import annotations

from aiohttp import HttpVersion11, web

from . import errors, guardrails
from .audio import Probe
from .audio_detect import for_answer, for_format
from .config import Guardrail
from .deadline import CLIENT, UPSTREAM, Deadline
from .exchange import Exchange
from .failover import Buffered
from .http1 import Answer
from .responses import stamp
from .speech_events import SpeechEvents
from .transcript import TranscriptReader

# The retry hints OpenAI's SDKs read (retry-after-ms before Retry-After; x-should-retry: whether to
# retry at all) go with the answer they came with; the upstream's x-ratelimit-* do not (a caller's
# limits are the gateway's, and its own headers say them).
_RELAYED = ("Content-Type", "Content-Length", "Content-Disposition", "Retry-After", "retry-after-ms",
            "x-should-retry")
_STREAMED = ("audio/", "text/event-stream")  # media types, lower-cased
HOLD_LIMIT = 1024 * 1024  # a held transcript over this cannot be checked: refused, never released


async def relay(
    request: web.Request, upstream: Answer | Buffered, ex: Exchange, deadline: Deadline, idle: float,
    output_rules: tuple[Guardrail, ...] = (), answer_format: str | None = None,
) -> web.StreamResponse:
    up = upstream.headers
    content_type = up.get("Content-Type", "")
    ok = ex.billable = upstream.status < 300
    if ex.route == "speech":  # output rules read transcripts: speech audio is never held nor screened
        output_rules = ()
    media = content_type.partition(";")[0].strip().lower()  # read once: which reader, and stream
    reader, probe = _readers(ex.route, media, content_type, answer_format) if ok else (None, None)
    try:
        held = None
        if isinstance(reader, TranscriptReader) and guardrails.blocks(output_rules):
            held = await _hold(upstream, reader, deadline, idle)
            ex.usage = reader.usage  # the upstream did the work, blocked or not: it is charged
            ex.verdict = guardrails.enforce(output_rules, reader.text)
        headers = {name: up[name] for name in _RELAYED if name in up}
        if "x-request-id" in up:
            headers["x-upstream-request-id"] = up["x-request-id"]
        response = web.StreamResponse(status=upstream.status, headers=headers)
        if "Content-Length" not in headers and request.version < HttpVersion11:
            # An HTTP/1.0 caller cannot take chunks: the body ends where the connection does.
            # aiohttp frames it so but keeps the connection (a keep-alive caller would wait out
            # the keep-alive timeout for an end that never comes).
            response.force_close()
        ex.status = upstream.status
        # Relayed as it came: speech audio (labelled or untyped: what a probe reads) and events,
        # whatever the case of their media type.
        ex.stream = ok and held is None and (probe is not None or media.startswith(_STREAMED))
        if not ok:
            ex.error_code = "upstream_error"
        stamp(request, response)
        if held is not None or upstream.ready:
            # The first body bytes are here: the head leaves with them, in one write (aiohttp's
            # own buffering for web.Response; a StreamResponse sends its head at once, a system
            # call of its own). Otherwise the head goes at once, as the caller waits for it.
            response._send_headers_immediately = False
        deadline.wait(idle, CLIENT)
        await response.prepare(request)
        ex.response = response
        if held is not None:
            await response.write(held)
            ex.bytes_out += len(held)
        else:
            await _stream(upstream, response, reader, probe, ex, deadline, idle)
        await response.write_eof()
    except BaseException:  # how it ends for the caller is the pipeline's (errors.outcome)
        upstream.close()
        # Speech cut short (the caller left, the upstream broke, the drain's deadline): what was
        # relayed is measured all the same, whole frames only; a caller that leaves just before
        # the end is charged for what it got, not for nothing.
        ex.audio_seconds_out = _relayed(probe, reader)
        raise
    upstream.release()  # read to the end: the connection goes back to the pool
    if probe is not None:
        ex.audio_seconds_out = probe.end()
    if reader is not None:
        if held is None:
            reader.finish()
            ex.verdict = guardrails.enforce(output_rules, reader.text) or ex.verdict
        ex.usage = reader.usage
        if isinstance(reader, SpeechEvents):
            ex.audio_seconds_out = reader.seconds()
    return response


def _readers(route: str, media: str, content_type: str,
             answer_format: str | None) -> tuple[TranscriptReader | SpeechEvents | None, Probe | None]:
    """What reads a 2xx answer as it passes: a transcript for its text and usage; speech audio for
    its duration, as it came (labelled audio/*, or untyped: application/octet-stream, as some
    providers label it, read as the format asked for) or as events (stream_format "sse": base64
    pieces, then the usage). ``media``: the Content-Type's media type, lower-cased."""
    if route != "speech":
        return None if media.startswith("audio/") else TranscriptReader(content_type, HOLD_LIMIT), None
    if media.startswith("audio/"):
        return None, for_answer(content_type)
    if media == "text/event-stream":
        return SpeechEvents(for_format(answer_format or "mp3")), None
    if media in ("application/octet-stream", ""):
        return None, for_format(answer_format or "mp3")
    return TranscriptReader(content_type, HOLD_LIMIT), None  # JSON or text: its usage, if it reports one


def _relayed(probe: Probe | None, reader: TranscriptReader | SpeechEvents | None) -> float | None:
    """The seconds of speech audio an answer cut short had relayed; None when it had none."""
    if isinstance(reader, SpeechEvents):
        return reader.at_least() or None
    if probe is None:
        return None
    return probe.at_least or None


async def _stream(
    upstream: Answer | Buffered, response: web.StreamResponse, reader: TranscriptReader | SpeechEvents | None,
    probe: Probe | None, ex: Exchange, deadline: Deadline, idle: float,
) -> None:
    while True:
        deadline.wait(idle, UPSTREAM)
        chunk = await upstream.read()
        if not chunk:
            return
        deadline.wait(idle, CLIENT)
        await response.write(chunk)
        ex.bytes_out += len(chunk)
        # Read once handed to the caller: an answer cut short is measured by what it relayed.
        if reader is not None:
            reader.feed(chunk)
        elif probe is not None:
            probe.feed(chunk)


async def _hold(upstream: Answer | Buffered, reader: TranscriptReader, deadline: Deadline, idle: float) -> bytes:
    body = bytearray()
    while True:
        deadline.wait(idle, UPSTREAM)
        chunk = await upstream.read()
        if not chunk:
            break
        body += chunk
        if len(body) > HOLD_LIMIT:
            raise errors.answer_too_large()
        reader.feed(chunk)
    reader.finish()
    return bytes(body)

