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

from collections.abc import AsyncIterator, Callable

from aiohttp import hdrs, web

from . import errors, multipart
from .config import Model, Resources, Settings
from .inbound import Inbound
from .spool import Spool
from .upstream import Body, Write

_MODEL_ONLY = frozenset({multipart.MODEL})
_PROMPT = frozenset({multipart.MODEL, "prompt"})
_SMALL = 16 * 1024  # below this, pieces are joined into one write


class FormBody:
    """A multipart body read up to its ``model`` value: the alias, the prompts before it, and the
    body to stream on."""

    __slots__ = ("_after", "_declared", "_held", "_inbound", "_rw", "_value_size", "alias", "content_type", "texts")

    def __init__(self, alias: str, texts: list[str], content_type: str, held: Spool, rw: multipart.Rewriter,
                 inbound: Inbound, after: list[multipart.Piece], value_size: int, declared: int | None) -> None:
        self.alias = alias
        self.texts = texts
        self.content_type = content_type
        self._held, self._rw, self._inbound = held, rw, inbound
        self._after = after  # what followed the model value in the chunk that held it
        self._value_size = value_size
        self._declared = declared

    def outbound(self, model: Model, screen: Callable[[str], None],
                 sent: Callable[[], None]) -> tuple[Body, int | None]:
        """The body as writes, and its length: the caller's Content-Length adjusted by the size
        difference of the model value (None: the caller sent it chunked, and so do we)."""
        length = self._declared
        if length is not None:
            length += len(model.model_name_bytes) - self._value_size
        return self._stream(model.model_name_bytes, screen, sent), length

    async def _stream(self, model_name: bytes, screen: Callable[[str], None],
                      sent: Callable[[], None]) -> AsyncIterator[Write]:
        rw, inbound = self._rw, self._inbound
        try:
            write: Write = []
            for chunk in self._held.chunks():  # one in memory; 256 KiB reads from a temp file
                if write:
                    yield write
                write = [chunk]
            after, self._after = self._after, []  # it holds the first chunk after the model
            write += _outgoing([model_name, *after], screen)
            del after
            yield write
            while True:
                chunk = await inbound.read()
                pieces = rw.feed(chunk) if chunk else rw.close()
                if pieces:
                    yield _outgoing(pieces, screen)
                if not chunk:
                    break
            sent()
        finally:
            self._held.close()

    def close(self) -> None:
        self._held.close()


async def read(request: web.Request, inbound: Inbound, settings: Settings, resources: Resources) -> FormBody:
    boundary = multipart.boundary_of(request.headers.get(hdrs.CONTENT_TYPE, ""))
    # Prompts are read only when some input guardrail could look at them.
    rw = multipart.Rewriter(boundary, _PROMPT if resources.scans_prompts else _MODEL_ONLY)
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
                                    pieces[i + 1:], len(piece.value), request.content_length)
            if not chunk:
                raise errors.missing_model()
    except BaseException:
        held.close()
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
