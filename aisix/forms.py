"""What is particular to ``/v1/audio/transcriptions`` and ``/translations``: a multipart body streamed
through the rewriter, never held in memory whatever the file's size.

``read`` reads up to the ``model`` part. What came before it (the whole file, when it comes
first) waits in a spool (memory, then an unlinked temp file); the body then leaves as: the
spool, the new model value, the rest as it arrives. Text fields met on the way are handed to the
pipeline's screen: those before the alias by ``texts``, those after it while the body streams,
each before the closing delimiter can go out, so a blocked request never reaches the upstream
complete.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import hdrs, web

from . import aliases, errors, multipart
from .audio import Probe, known_seconds
from .audio_detect import Detect
from .config import Resources, Settings, Target
from .inbound import Inbound
from .spool import Spool
from .upstream import Body, Write

log = logging.getLogger(__name__)

_MODEL_ONLY = frozenset({multipart.MODEL})
_PROMPT = frozenset({multipart.MODEL, "prompt"})
_SMALL = 16 * 1024  # below this, pieces are joined into one write
_BATCH, _BATCH_PIECES = 256 * 1024, 64  # a replayed write: at most this many bytes (or pieces), roughly
# A replay copy up to this stays in memory (within the spools' process-wide budget): most voice
# clips are smaller, and a temp file costs more per request than the copy itself.
COPY_IN_MEMORY = 512 * 1024


class FormBody:
    """A multipart body read up to its ``model`` value: the alias, the prompts before it, and the
    body to stream on, to one target or, for a failover, to the next one again from its start.

    For a replay, what went out after the model value is copied to disk as it goes (``keep``):
    another target then gets the held head, its own model value, the copy, and the rest as it
    arrives. The rewriter and the caller's stream are read by one attempt at a time."""

    __slots__ = ("_after", "_copy", "_declared", "_ended", "_held", "_inbound", "_limit", "_reading", "_rw",
                 "_started", "_value_size", "alias", "audio", "characters", "check_audio", "content_type", "texts")

    def __init__(self, alias: str, texts: list[str], content_type: str, held: Spool, rw: multipart.Rewriter,
                 inbound: Inbound, after: list[multipart.Piece], value_size: int, declared: int | None,
                 audio: Probe) -> None:
        self.alias = alias
        self.characters = None
        self.audio = audio  # fed the file part's bytes by the rewriter
        # Given the audio's length as soon as it is known (a header's, or at least what has passed),
        # before the bytes that told it are sent on: it raises to end the upload.
        self.check_audio: Callable[[float], None] | None = None
        self.texts = texts
        self.content_type = content_type
        self._held, self._rw, self._inbound = held, rw, inbound
        self._after: list[multipart.Piece] | None = after  # what followed the model value in its chunk
        self._value_size = value_size
        self._declared = declared
        self._copy: Spool | None = None  # what went out after the model value, while it can be replayed
        self._limit = 0
        self._started = False  # an attempt has begun reading the body
        self._ended = False  # the caller's body has been read to its end
        self._reading: asyncio.Event | None = None  # set once the attempt reading it has let go

    def keep(self, limit: int) -> None:
        """Copy what is sent to disk, up to ``limit`` bytes in all (held head included), so that
        another attempt can replay it; past the limit the copy is dropped."""
        if limit and not self._started and self._held.size < limit:
            self._copy, self._limit = Spool(COPY_IN_MEMORY), limit

    def replayable(self) -> bool:
        return self._copy is not None or not self._started

    answer_format = None  # a transcript, not audio

    def outbound(self, target: Target, screen: Callable[[str], None],
                 sent: Callable[[], None]) -> tuple[Body, int | None]:
        """The body as writes, and its length: the caller's Content-Length adjusted by the size
        difference of the model value (None: the caller sent it chunked, and so do we)."""
        length = self._declared
        if length is not None:
            length += len(target.model_name_bytes) - self._value_size
        return self._stream(target.model_name_bytes, screen, sent), length

    async def _stream(self, model_name: bytes, screen: Callable[[str], None],
                      sent: Callable[[], None]) -> AsyncIterator[Write]:
        if self._reading is not None:  # the previous attempt's writer may still be letting go
            await self._reading.wait()
        reading = self._reading = asyncio.Event()
        rw, inbound, held, copy = self._rw, self._inbound, self._held, self._copy
        try:
            self._started = True
            self._check()
            # What was held before the model, the model value for this target, and what earlier
            # attempts sent on after it (a failover), in writes of up to _BATCH bytes: pieces kept
            # in memory are joined into few writes; a temp file is read 256 KiB at a time.
            write: Write = []
            size = 0
            for chunk in itertools.chain(held.replay() if copy is not None else held.chunks(), (model_name,),
                                         copy.replay() if copy is not None else ()):
                if write and (size >= _BATCH or len(write) >= _BATCH_PIECES):
                    yield write
                    inbound.taken()  # asked for the next: the upstream has read enough of this one
                    write, size = [], 0
                write.append(chunk)
                size += len(chunk)
            if self._after is not None:  # the first chunk after the model, not sent on yet
                after, self._after = self._after, None
                out = _outgoing(after, screen)
                del after
                self._keep(out)
                write += out
            yield write
            del write  # its pieces (up to the first chunk after the model) are not held for the upload
            while not self._ended:
                chunk = await inbound.read()
                pieces = rw.feed(chunk) if chunk else rw.close()
                self._ended = not chunk
                self._check()
                if pieces:
                    out = _outgoing(pieces, screen)
                    self._keep(out)  # before it is handed on: a writer cancelled after this replays it
                    yield out
            sent()
        finally:
            reading.set()
            if self._copy is None:
                held.close()

    def _check(self) -> None:
        if self.check_audio is not None:
            self.check_audio(known_seconds(self.audio))

    def audio_seconds(self) -> float | None:
        """The file's duration, once the whole body has been read; None before, or when its
        format cannot tell."""
        return self.audio.end() if self._ended else None

    def _keep(self, out: Write) -> None:
        copy = self._copy
        if copy is None:
            return
        if self._held.size + copy.size + sum(map(len, out)) > self._limit:
            copy.close()  # too big to replay: the disk is given back, and no later failure is retried
            self._copy = None
            return
        try:
            for piece in out:
                copy.write(piece)
        except OSError as exc:  # the temp directory is full: this request goes on, without a retry
            log.warning("upload copy for a failover dropped: %s", exc.strerror or exc)
            copy.close()
            self._copy = None

    def close(self) -> None:
        self._held.close()
        if self._copy is not None:
            self._copy.close()
            self._copy = None


async def read(request: web.Request, inbound: Inbound, settings: Settings, resources: Resources) -> FormBody:
    boundary = multipart.boundary_of(request.headers.get(hdrs.CONTENT_TYPE, ""))
    # Prompts are read only when some input guardrail could look at them.
    rw = multipart.Rewriter(boundary, _PROMPT if resources.scans_prompts else _MODEL_ONLY)
    audio = Detect()
    rw.on_file = audio.feed
    held = Spool()
    texts: list[str] = []
    try:
        while True:
            chunk = await inbound.read()
            pieces = rw.feed(chunk) if chunk else rw.close()
            for i, piece in enumerate(pieces):
                if not isinstance(piece, multipart.Field):
                    held.write(piece)
                elif piece.name != multipart.MODEL:
                    texts.append(_text(piece))
                    held.write(piece.value)
                else:
                    return FormBody(_text(piece), texts, multipart.content_type_for(boundary), held, rw, inbound,
                                    pieces[i + 1:], len(piece.value), request.content_length, audio)
            if not chunk:
                raise errors.missing_model()
    except BaseException:
        held.close()
        if rw.model:  # read in the chunk whose end then failed the form (no file): still the caller's alias
            alias = rw.model.decode("utf-8", "replace")
            inbound.exchange.model = aliases.recorded(alias, resources.models)
        raise


def _outgoing(pieces: list[multipart.Piece], screen: Callable[[str], None]) -> Write:
    """The pieces as one write: small ones joined (fewer iovecs), large ones as they are (no
    copy of file bytes), and any text field among them screened before the write can go out."""
    out: Write = []
    small = bytearray()
    for piece in pieces:
        if isinstance(piece, multipart.Field):
            screen(_text(piece))
            piece = piece.value
        if len(piece) >= _SMALL:
            if small:
                out.append(small)
                small = bytearray()
            out.append(piece)
        else:
            small += piece
    if small:
        out.append(small)
    return out


def _text(field: multipart.Field) -> str:
    try:
        value = field.value.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.invalid_multipart(f"The '{field.name}' field is not valid UTF-8.") from None
    if not value and field.name == multipart.MODEL:
        raise errors.missing_model()
    return value
