"""What the gateway reads in a realtime session's frames: the few client events it checks or
rewrites, the server events that report usage and transcripts, and the error events it answers.

[core] Takes a frame's bytes, returns what to do with it; no sockets, no clock. Every other frame
passes through untouched, and most are never parsed: ``needs_reading`` says, from the raw bytes,
whether a client frame could be one of the checked events. A client frame that is parsed is sent
on re-serialised from what was checked (as speech.py does), so a duplicated key cannot pass the
checks as one event and reach the upstream as another.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import stringzilla

from .transcript import Usage

SESSION_UPDATE = "session.update"
TRANSCRIPTION_SESSION_UPDATE = "transcription_session.update"
ITEM_CREATE = "conversation.item.create"
RESPONSE_CREATE = "response.create"
_CHECKED = (SESSION_UPDATE.encode(), ITEM_CREATE.encode(), RESPONSE_CREATE.encode())
# A JSON string can spell any character as an escape ("session\u002eupdate"); a frame with a
# backslash is read, whatever it seems to say. Audio (base64) never has one.
_ESCAPE = b"\\"
# Server events worth reading: usage and transcripts, and a response's start and end (a caller that
# leaves mid-response: realtime.Session.collect). Their types end so ("response.done",
# "…transcription.completed", "…transcript.done", "…text.done", "response.created"); base64 audio
# has neither a dot nor a quote, and a quote inside a JSON string is escaped. The upstream is
# trusted not to hide them.
_REPORTED = (b'.done"', b'.completed"', b'.created"')
_find = stringzilla.find
# The most values a client frame the gateway reads may hold: parsed whole, each is a Python object
# of 30 to 100 bytes ("{}," is 3 bytes of JSON and over 100 of memory), so 16 MiB of them built
# some 500 MiB. Counted from the bytes before parsing: commas, colons and opening brackets, in
# strings too (an overcount; base64 has none). 131,072 is about 14 MiB at worst; an event's
# instructions, tools and items have a few thousand.
MAX_VALUES = 1 << 17
_SEPARATORS = (b",", b":", b"{", b"[")


def needs_reading(frame: bytes, binary: bool = False) -> bool:
    """Whether a client frame may be an event the gateway checks. Events are text frames, but a
    binary frame holding a JSON object is read too, in case an upstream takes it for one; so is
    one that may hold it in another encoding a JSON reader of bytes detects (``lax_object``)."""
    if binary:
        if other_encoding(frame):
            return True
        if not frame.lstrip(b" \t\r\n").startswith(b"{"):
            return False
    # This runs on every frame: stringzilla's SIMD find (as the multipart rewriter's delimiter
    # search), spelled out rather than a generator; 4x less than `in` on a base64 audio frame.
    checked0, checked1, checked2 = _CHECKED
    return (_find(frame, _ESCAPE) >= 0 or _find(frame, checked0) >= 0 or _find(frame, checked1) >= 0
            or _find(frame, checked2) >= 0)


def other_encoding(frame: bytes) -> bool:
    """Whether a binary frame may be a JSON object to a reader that detects the encoding of bytes
    as RFC 4627 and Python's json do (a byte order mark, UTF-16, UTF-32): its start, decoded so,
    is ``{`` or blank. Audio seldom is (PCM silence decodes as NULs)."""
    encoding = json.detect_encoding(frame[:4])
    if encoding == "utf-8":
        return False
    head = frame[:4096].decode(encoding, "ignore").lstrip(" \t\r\n\ufeff")
    return head == "" or head.startswith("{")


def lax_object(frame: bytes) -> bool:
    """Whether a frame orjson could not read is a JSON object to a laxer reader: Python's json
    (aiohttp's ``WSMessage.json()``) takes bytes behind a byte order mark, in UTF-16 or UTF-32,
    and ``NaN`` and ``Infinity``; Go's encoding/json and a browser's TextDecoder read invalid
    UTF-8 as U+FFFD."""
    try:
        return isinstance(json.loads(frame), dict)
    except UnicodeDecodeError:
        encoding = json.detect_encoding(frame[:4])
        if encoding not in ("utf-8", "utf-8-sig"):
            return False  # (those readers take UTF-8 alone; TextDecoder skips its byte order mark)
        # Each byte that is not ASCII made a '?': valid in a string, as U+FFFD is, and not
        # outside one, as the bytes were not. (A decode with "replace" costs 30 times as much
        # on noise; a translate, a copy, and ASCII decodes at memory speed.)
        try:
            return isinstance(json.loads(frame.translate(_ASCII_ONLY)[3 if encoding == "utf-8-sig" else 0:]), dict)
        except ValueError:
            return False
        except RecursionError:
            return True  # as below
    except ValueError:
        return False
    except RecursionError:
        # JSON nested past Python's limit (1,000; orjson's is 1,024) with no error before it: Go's
        # encoding/json reads 10,000 levels, a browser's JSON.parse more. Not audio.
        return True


_ASCII_ONLY = bytes(range(128)) + b"?" * 128


_OPENS_AN_OBJECT = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*"')


def opens_an_object(frame: bytes) -> bool:
    """Whether a frame starts as a JSON object with a member does (``{"``, blanks around the
    brace): one a JSON reader may take for an event. Matched in place: a frame may be 16 MiB."""
    return _OPENS_AN_OBJECT.match(frame) is not None


def too_many_values(frame: bytes) -> bool:
    """Whether a frame to read may hold more than MAX_VALUES JSON values (see there)."""
    count = 0
    for separator in _SEPARATORS:
        count += stringzilla.count(frame, separator)
        if count > MAX_VALUES:
            return True
    return False


def valid_text(frame: bytes) -> bool:
    """Whether a text frame's payload is UTF-8, as RFC 6455 requires (frames stay bytes, unread by
    aiohttp): checked in C, ASCII (JSON with base64 audio, nearly every frame) without a decode."""
    if frame.isascii():
        return True
    try:
        frame.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def reports(frame: bytes) -> bool:
    """Whether a server text frame may report usage, a transcript, or a response's start or end."""
    done, completed, created = _REPORTED  # as in needs_reading
    return _find(frame, done) >= 0 or _find(frame, completed) >= 0 or _find(frame, created) >= 0


@dataclass(slots=True)
class Named:
    """A model a client event names: the value as sent (an alias, to be checked), and where the
    upstream model name goes in its place; ``value`` None when the field is not a string, or
    (``absent``) not there at all."""

    value: str | None
    _holder: dict[str, Any]
    absent: bool = False

    def rewrite(self, model_name: str) -> None:
        self._holder["model"] = model_name


@dataclass(slots=True)
class ClientEvent:
    """A parsed client event: its type, the models it names, the texts to screen."""

    doc: dict[str, Any]
    type: str
    transcription_models: list[Named]  # every place a session.update names one, in order
    session_model: Named | None  # session.update's session.model: the session's own
    texts: list[str]
    clash: str | None = None  # a key the gateway reads, spelled in another case: the frame is refused

    def encode(self) -> bytes:
        return orjson.dumps(self.doc)

    def held(self) -> ClientEvent:
        """What is kept of it while its frame waits (its type, texts and event_id): the document
        parsed costs many times the frame."""
        eid = self.event_id
        return ClientEvent({"event_id": eid} if eid is not None else {}, self.type, [], None, self.texts)

    @property
    def event_id(self) -> str | None:
        value = self.doc.get("event_id")
        return value if isinstance(value, str) else None


# The names the gateway reads in a client event. A key that is one of them in another case is
# refused: readers that match keys without case (Go's encoding/json, .NET's web defaults; Go folds
# the Kelvin sign and the long s too, as casefold() does) would read a model the gateway never
# checked, or a text it never screened.
_READ_KEYS = frozenset({"type", "session", "model", "instructions", "audio", "input", "transcription",
                        "input_audio_transcription", "prompt", "item", "content", "text", "output", "response",
                        "arguments", "transcript"})


def _clash(doc: dict[str, Any]) -> str | None:
    for key in doc:
        folded = key.casefold()
        if folded != key and folded in _READ_KEYS:
            return folded
    return None


def parse_client(frame: bytes) -> ClientEvent | None:
    """The event of a client frame, or None when it is not a JSON object."""
    try:
        doc = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    read: list[dict[str, Any]] = [doc]  # every object whose keys the gateway reads
    kind = doc.get("type")
    kind = kind if isinstance(kind, str) else ""
    models: list[Named] = []
    session_model = None
    texts: list[str] = []
    if kind in (SESSION_UPDATE, TRANSCRIPTION_SESSION_UPDATE):
        session = _dict(doc, "session")
        if session is not None:
            read.append(session)
            texts += _strings(session, "instructions")
            if kind == SESSION_UPDATE and "model" in session:
                session_model = _named(session)
            for holder in _transcription_configs(session, read):
                texts += _strings(holder, "prompt")
                # (one without a model is kept too: the provider would use its default model)
                models.append(_named(holder) if "model" in holder else Named(None, holder, absent=True))
    elif kind == ITEM_CREATE:
        texts += _item_texts(_dict(doc, "item"), read)
    elif kind == RESPONSE_CREATE:
        response = _dict(doc, "response")
        if response is not None:
            read.append(response)
            texts += _strings(response, "instructions")
            items = response.get("input")
            for item in items if isinstance(items, list) else ():  # out-of-band input (GA)
                texts += _item_texts(item if isinstance(item, dict) else None, read)
    clash = None
    for obj in read:
        clash = clash or _clash(obj)
    return ClientEvent(doc, kind, models, session_model, texts, clash)


def _item_texts(item: dict[str, Any] | None, read: list[dict[str, Any]]) -> list[str]:
    """What the model reads of a conversation item: its content parts' text (and an audio part's
    transcript), a function call's arguments and output."""
    if item is None:
        return []
    read.append(item)
    texts = _strings(item, "output") + _strings(item, "arguments")
    content = item.get("content")
    for part in content if isinstance(content, list) else ():
        if isinstance(part, dict):
            read.append(part)
            texts += _strings(part, "text") + _strings(part, "transcript")
    return texts


def _transcription_configs(session: dict[str, Any], read: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Where a session names its transcription model: ``audio.input.transcription`` (GA
    ``session.update``), ``input_audio_transcription`` (beta and ``transcription_session.update``)."""
    audio = _dict(session, "audio")
    audio_input = _dict(audio, "input") if audio is not None else None
    read += [d for d in (audio, audio_input) if d is not None]
    for holder in (_dict(audio_input, "transcription") if audio_input is not None else None,
                   _dict(session, "input_audio_transcription")):
        if holder is not None:
            read.append(holder)
            yield holder


def _named(holder: dict[str, Any]) -> Named:
    value = holder["model"]
    return Named(value if isinstance(value, str) else None, holder)


def _dict(doc: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    value = doc.get(key) if doc is not None else None
    return value if isinstance(value, dict) else None


def _strings(doc: dict[str, Any], key: str) -> list[str]:
    value = doc.get(key)
    return [value] if isinstance(value, str) and value else []


@dataclass(slots=True)
class ServerReport:
    """What one server event reported: usage to charge and a transcript to monitor."""

    usage: Usage | None = None
    transcript: str | None = None
    transcription: bool = False  # an input audio transcription's: its usage is the transcription model's
    created: str | None = None  # a response.created's response id ("" when it has none)
    done: str | None = None  # a response.done's response id ("" when it has none)
    error: bool = False  # an error event
    answers: str | None = None  # an error event's: the event_id of the client event it answers, if it says


def parse_server(frame: bytes) -> ServerReport:
    try:
        doc = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return ServerReport()
    if not isinstance(doc, dict):
        return ServerReport()
    kind = doc.get("type")
    out = ServerReport()
    if kind == "response.done":
        response = _dict(doc, "response")
        out.usage = _usage(_dict(response, "usage") if response is not None else None)
        out.done = _response_id(response)
    elif kind == "response.created":
        out.created = _response_id(_dict(doc, "response"))
    elif kind == "error":
        out.error = True
        error = _dict(doc, "error")
        out.answers = _text(error, "event_id") if error is not None else None
    elif kind == "conversation.item.input_audio_transcription.completed":
        out.usage = _usage(_dict(doc, "usage"))
        out.transcript = _text(doc, "transcript")
        out.transcription = True
    elif isinstance(kind, str) and kind.endswith("transcript.done"):
        out.transcript = _text(doc, "transcript")
    elif isinstance(kind, str) and kind.endswith("text.done"):
        out.transcript = _text(doc, "text")
    return out


def _response_id(response: dict[str, Any] | None) -> str:
    value = response.get("id") if response is not None else None
    return value if isinstance(value, str) else ""


def _text(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    return value if isinstance(value, str) else None


def _count(doc: dict[str, Any], key: str) -> int | None:
    value = doc.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _usage(doc: dict[str, Any] | None) -> Usage | None:
    """Token usage (``input_tokens``, ``output_tokens``, ``total_tokens``) or duration usage
    (``{"type": "duration", "seconds": …}``), as reported; None when nothing is."""
    if doc is None:
        return None
    seconds = doc.get("seconds")
    usage = Usage(_count(doc, "input_tokens"), _count(doc, "output_tokens"), _count(doc, "total_tokens"),
                  float(seconds) if isinstance(seconds, int | float) and not isinstance(seconds, bool)
                  and seconds >= 0 else None)
    if usage.tokens is None and usage.audio_seconds is None:
        return None
    return usage


def add(total: Usage | None, more: Usage) -> Usage:
    """The session's totals with one more report added."""
    if total is None:
        total = Usage()
    total.input_tokens = _plus(total.input_tokens, more.input_tokens)
    total.output_tokens = _plus(total.output_tokens, more.output_tokens)
    total.total_tokens = _plus(total.total_tokens, more.tokens)
    total.audio_seconds = _plus(total.audio_seconds, more.audio_seconds)
    return total


def _plus(a: Any, b: Any) -> Any:
    return a if b is None else b if a is None else a + b


def event_id() -> str:
    """An event_id for an event of the gateway's own."""
    return "event_aisix_" + secrets.token_hex(8)


def cancel_event(response_id: str, eid: str | None = None) -> bytes:
    """A client ``response.cancel`` event, of the gateway's own (event_id ``eid``, else a new
    one): for ``response_id``, or (when empty) for whatever response is in progress in the default
    conversation."""
    event: dict[str, Any] = {"type": "response.cancel", "event_id": eid or event_id()}
    if response_id:
        event["response_id"] = response_id
    return orjson.dumps(event)


def error_event(code: str, message: str, client_event_id: str | None = None,
                kind: str = "invalid_request_error") -> bytes:
    """A server ``error`` event in the Realtime API's shape, for what the gateway refuses."""
    error: dict[str, Any] = {"type": kind, "code": code, "message": message, "param": None,
                             "event_id": client_event_id}
    return orjson.dumps({"type": "error", "event_id": event_id(), "error": error})
