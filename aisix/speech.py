"""What is particular to ``/v1/audio/speech``: a small JSON body, read whole (capped), with only its
``model`` value replaced on the way out.

Re-serialised rather than spliced: the upstream gets exactly the document that was checked (a
duplicated ``model`` key cannot authorise one alias and reach the upstream as another), with
every other key in its order and with its value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from . import errors
from .audio import Probe
from .config import Resources, Settings, Target
from .inbound import Inbound

CONTENT_TYPE = "application/json"
_LONG_NUMBER = re.compile(rb"\d{19,}")
_BOM = b"\xef\xbb\xbf"
# Arrays and objects nested deeper than this cannot be sent on: orjson reads 1,023 levels but
# writes 254 (the stdlib, for a document with long integers, fails near its recursion limit).
MAX_DEPTH = 254
# The alias, the text screened and priced, the text screened with it (``instructions`` steer what
# the voice says, as a realtime session's do), and the format an untyped or SSE answer is measured
# as (``response_format``: read in another case upstream, the answer would go unmeasured, unpriced).
_READ_KEYS = frozenset({"model", "input", "instructions", "response_format"})
_SCREENED = ("input", "instructions")


class SpeechBody:
    """The caller's JSON document: its alias, the text to screen, and the body to send."""

    __slots__ = ("_doc", "_exact", "alias", "audio", "characters", "check_audio", "texts")
    content_type = CONTENT_TYPE

    def __init__(self, doc: dict[str, Any], exact: bool) -> None:
        alias = doc.get("model")
        if not isinstance(alias, str) or not alias:
            raise errors.missing_model()
        self.alias = alias
        text = doc.get("input")
        self.texts = [t for t in map(doc.get, _SCREENED) if isinstance(t, str)]
        self.characters = len(text) if isinstance(text, str) else None  # code points, as OpenAI counts them
        self.audio: Probe | None = None  # the audio of a speech request is in its answer (relay.py)
        self.check_audio: Callable[[float], None] | None = None
        self._doc = doc
        self._exact = exact

    @property
    def answer_format(self) -> str:
        fmt = self._doc.get("response_format")
        return fmt if isinstance(fmt, str) else "mp3"

    def outbound(self, target: Target, screen: Callable[[str], None],
                 sent: Callable[[], None]) -> tuple[bytes, int | None]:
        doc = self._doc
        doc["model"] = target.model_name
        if self._exact:
            body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        else:
            body = orjson.dumps(doc)
        return body, len(body)  # bytes: it leaves with its head in one write, and the pool calls sent()

    def keep(self, limit: int) -> None:
        pass  # the document is kept anyway: a few KiB

    def replayable(self) -> bool:
        return True

    def audio_seconds(self) -> float | None:
        return None

    def close(self) -> None:
        pass


async def read(request: web.Request, inbound: Inbound, settings: Settings, resources: Resources) -> SpeechBody:
    if request.content_type != CONTENT_TYPE:
        raise errors.unsupported_content_type(CONTENT_TYPE)
    raw = await inbound.read_all(settings.proxy.json_body_limit_bytes)
    if raw.startswith(_BOM):  # RFC 8259 lets a parser ignore it; the body sent on never has one
        raw = raw[len(_BOM):]
    try:
        doc = orjson.loads(raw)
        exact = _LONG_NUMBER.search(raw) is not None
        if exact:  # orjson reads an integer past 64 bits as a float; the stdlib keeps it exact
            doc = json.loads(raw)
    except (orjson.JSONDecodeError, RecursionError):
        raise errors.invalid_json("The request body is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise errors.invalid_json("The request body must be a JSON object.")
    if not _shallow(doc):
        raise errors.invalid_json(f"The request body is nested more than {MAX_DEPTH} levels deep.")
    # A key the gateway reads (_READ_KEYS) spelled in another case would reach the upstream
    # unchecked, and readers that match keys without case (Go's encoding/json, .NET's web
    # defaults) would take it for the one the gateway read.
    for key in doc:
        folded = key.casefold()
        if folded != key and folded in _READ_KEYS:
            raise errors.invalid_json(f"The request body has a key that differs from '{folded}' only in case.")
    return SpeechBody(doc, exact)


def _shallow(doc: dict[str, Any]) -> bool:
    """Whether no array or object of the document is nested deeper than MAX_DEPTH; walked without
    recursion, every container once."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        for item in value.values() if isinstance(value, dict) else value:
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))
    return True
