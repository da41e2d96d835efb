"""What a transcription answer says, read while it is relayed: its text and its reported usage.

[core] Fed the answer's chunks as they pass; keeps at most ``limit`` bytes of JSON or text and one
SSE line, so memory is bounded whatever the answer. Nothing is guessed: usage is only what the
upstream reported (``usage`` in JSON or in an SSE event; ``usage.seconds`` or ``duration``).
Speech audio is never given to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

_LIMIT = 1024 * 1024


@dataclass(slots=True)
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    audio_seconds: float | None = None

    @property
    def tokens(self) -> int | None:
        if self.total_tokens is not None:
            return self.total_tokens
        if self.input_tokens is None and self.output_tokens is None:
            return None
        return (self.input_tokens or 0) + (self.output_tokens or 0)


class TranscriptReader:
    __slots__ = ("_kind", "_buf", "_limit", "_over", "_parts", "_kept", "text", "usage")

    def __init__(self, content_type: str, limit: int = _LIMIT) -> None:
        media = content_type.split(";", 1)[0].strip().lower()
        self._kind = "sse" if media == "text/event-stream" else "json" if media.endswith("json") else "text"
        self._buf = bytearray()
        self._limit = limit
        self._over = False
        self._parts: list[str] = []
        self._kept = 0  # bytes of the body read (JSON, text), or of the text kept (SSE), against the cap
        self.text = ""
        self.usage = Usage()

    def feed(self, chunk: bytes | bytearray) -> None:
        if self._over:
            return
        if self._kind == "sse":
            # Events are read as they pass: what is kept is one line and the text, each capped;
            # the usage comes in the last event, however long the stream before it.
            chunk = line_ends(chunk)
            self._buf += chunk
            if b"\n" in chunk:  # else no line ended: the one held is not searched again
                self._lines()
            if len(self._buf) > self._limit:
                self._over = True  # one line past the cap: no text, no usage, never a guess
                self._buf.clear()
            return
        self._buf += chunk
        self._kept += len(chunk)
        if self._kept > self._limit:
            self._over = True  # past the cap we stop reading: no text, no usage, never a guess
            self._buf.clear()

    def finish(self) -> None:
        if self._over:
            return
        if self._kind == "sse":
            self._buf += b"\n"
            self._lines()
            self.text = "".join(self._parts)
        elif self._kind == "json":
            self._json(self._buf)
        else:
            self.text = self._buf.decode("utf-8", "replace")
        self._buf.clear()

    def _lines(self) -> None:
        for event in sse_events(self._buf):
            if event is None:
                continue
            if isinstance(event.get("delta"), str):
                self._keep_text(event["delta"])
            elif isinstance(event.get("text"), str) and not self._parts and self._kept <= self._limit:
                self._keep_text(event["text"])
            read_usage(event, self.usage)

    def _keep_text(self, text: str) -> None:
        """An event's text, while the text kept is under the cap; past it none is kept (a
        transcript is never checked in part)."""
        if self._kept > self._limit:
            return
        self._kept += len(text)
        if self._kept > self._limit:
            self._parts.clear()
        else:
            self._parts.append(text)

    def _json(self, body: bytes | bytearray) -> None:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        texts = [doc["text"]] if isinstance(doc.get("text"), str) else []
        for segment in doc.get("segments") or ():
            if isinstance(segment, dict) and isinstance(segment.get("text"), str):
                texts.append(segment["text"])
        self.text = "\n".join(texts)
        read_usage(doc, self.usage)
        duration = _seconds(doc.get("duration"))
        if duration is not None and self.usage.audio_seconds is None:
            self.usage.audio_seconds = duration


def line_ends(chunk: bytes | bytearray) -> bytes | bytearray:
    """An event stream's chunk with its line ends as LF: SSE ends a line with CRLF, LF or a CR
    alone (a CRLF cut between two chunks makes an empty line: an event's end, harmless)."""
    return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if b"\r" in chunk else chunk


def sse_events(buf: bytearray) -> list[dict[str, Any] | None]:
    """The JSON objects of the whole ``data:`` lines in ``buf`` (LF-ended: ``line_ends``), which
    loses every whole line (an unfinished last one stays); None for a data line that is not one (a
    piece of an event whose data spans lines, say), but for an empty one and ``[DONE]``. Other
    lines are passed over."""
    events: list[dict[str, Any] | None] = []
    start = 0
    while (end := buf.find(b"\n", start)) >= 0:
        if buf.startswith(b"data:", start):
            data = bytes(buf[start + 5:end]).strip()
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                event = None
            if isinstance(event, dict):
                events.append(event)
            elif data and data != b"[DONE]":
                events.append(None)
        start = end + 1
    del buf[:start]
    return events


def read_usage(doc: dict, u: Usage) -> None:
    """What a JSON answer or event reports in ``usage`` (tokens, or seconds), into ``u``. A figure
    is taken only when it is a count (>= 0, not a boolean): a negative one would be billed as a
    credit, ``true`` as 1."""
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        return
    for name in ("input_tokens", "output_tokens", "total_tokens"):
        value = usage.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            setattr(u, name, value)
    seconds = _seconds(usage.get("seconds"))
    if seconds is not None:
        u.audio_seconds = seconds


def _seconds(value: object) -> float | None:
    """A reported number of seconds: a number >= 0, not a boolean; else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None
