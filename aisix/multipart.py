"""Sans-IO multipart/form-data rewriter: passes every byte through except captured field values.

[core] Bytes in, pieces out, no I/O. It holds at most one part header block (16 KiB by default),
one captured value (64 KiB) and a delimiter's length of tail, whatever the body size.

``feed()`` returns the body as a list of pieces in order: byte chunks to forward as they are,
and a ``Field`` where a captured field's value stood. The value itself is withheld: the caller
writes whatever belongs in its place (the upstream model id for ``model``; the same bytes for a
field it only wanted to read). The closing delimiter is released only once the body is known to
hold a ``model`` and a ``file`` part, so an upstream can never receive a complete request that
the gateway rejects.

Delimiter matching follows RFC 2046 as Go's mime/multipart reads it: ``CRLF--boundary`` is a
delimiter only when followed by ``--``, or by optional spaces/tabs and CRLF; anything else after
it is part data, passed through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from . import errors

MODEL = "model"
FILE = "file"

_CRLF = b"\r\n"
_BLANK = b"\r\n\r\n"
_BOUNDARY_PARAM = re.compile(r';\s*boundary\s*=\s*(?:"([^"]{1,70})"|([^\s;"]{1,70}))\s*(?:;|$)', re.IGNORECASE)
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')

# Parser states.
_DATA, _DELIM, _HEAD, _EPILOGUE = range(4)


@dataclass(frozen=True, slots=True)
class Field:
    """A captured form field, in the place its value had in the body."""

    name: str
    value: bytes


Piece = Union[bytes, bytearray, Field]


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type, or a 400."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "multipart/form-data":
        raise errors.unsupported_content_type("multipart/form-data")
    m = _BOUNDARY_PARAM.search(";" + params)
    if m is None:
        raise errors.invalid_multipart("Content-Type has no valid multipart boundary.")
    value = m.group(1) or m.group(2)
    if value.endswith(" "):
        raise errors.invalid_multipart("Content-Type has no valid multipart boundary.")
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        raise errors.invalid_multipart("Content-Type has no valid multipart boundary.") from None


def disposition(head: bytes) -> tuple[str | None, bool]:
    """(form field name, has a filename) from a part's header block."""
    for line in head.split(_CRLF):
        key, sep, value = line.partition(b":")
        if not sep or key.strip().lower() != b"content-disposition":
            continue
        text = value.decode("utf-8", "replace")
        kind, _, params = text.partition(";")
        if kind.strip().lower() != "form-data":
            return None, False
        name, has_filename = None, False
        for m in _PARAM.finditer(";" + params):
            key_ = m.group(1).lower()
            raw = m.group(2).strip()
            if raw.startswith('"'):
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            if key_ == "name":
                name = raw
            elif key_ in ("filename", "filename*"):
                has_filename = True
        return name, has_filename
    return None, False


class Rewriter:
    """One multipart body, fed in chunks of any size."""

    __slots__ = (
        "_delim", "_buf", "_state", "_drop", "_max_head", "_max_value",
        "_capture", "_current", "_value", "_scanned", "seen", "parts",
    )

    def __init__(
        self,
        boundary: bytes,
        capture: frozenset[str] = frozenset({MODEL}),
        max_head: int = 16 * 1024,
        max_value: int = 64 * 1024,
    ) -> None:
        self._delim = b"\r\n--" + boundary
        # A virtual CRLF in front lets the first boundary line match the same delimiter as every
        # other; _drop keeps those two bytes out of the output.
        self._buf = bytearray(_CRLF)
        self._drop = 2
        self._state = _DATA
        self._max_head = max_head
        self._max_value = max_value
        self._capture = capture
        self._current: str | None = None  # captured field whose value is being read
        self._value = bytearray()
        self._scanned = 0  # how much of a head block has been searched for its blank line
        self.seen: set[str] = set()  # captured names and "file", as met
        self.parts = 0

    def feed(self, data: bytes | bytearray) -> list[Piece]:
        out: list[Piece] = []
        if self._state == _EPILOGUE:
            if data:
                out.append(data)
            return out
        buf = self._buf
        buf += data
        delim = self._delim
        while True:
            state = self._state
            if state == _DATA:
                i = buf.find(delim)
                if i < 0:
                    keep = _prefix_start(buf, delim)
                    if keep:
                        self._sink(out, buf[:keep])
                        del buf[:keep]
                    return out
                if i:
                    self._sink(out, buf[:i])
                    del buf[:i]
                self._state = _DELIM
            elif state == _DELIM:
                n = len(delim)
                if len(buf) < n + 2:
                    return out
                after = buf[n]
                if after == 0x2D and buf[n + 1] == 0x2D:  # "--": the closing delimiter
                    self._end_part(out)
                    self._check_complete()
                    self._emit(out, buf[:])
                    buf.clear()
                    self._state = _EPILOGUE
                    return out
                if after in (0x20, 0x09, 0x0D):
                    self._state = _HEAD
                    self._scanned = 0
                else:  # CRLF--boundary followed by anything else is part data
                    self._sink(out, buf[:n])
                    del buf[:n]
                    self._state = _DATA
            else:  # _HEAD: buf starts with the delimiter of a new part
                n = len(delim)
                end = buf.find(_BLANK, max(n, self._scanned - 3))
                self._scanned = len(buf)
                # The cap counts from the boundary line's "--" to the blank line, included.
                if (len(buf) if end < 0 else end + 4) - 2 > self._max_head:
                    raise errors.invalid_multipart(
                        f"A part header block is over {self._max_head} bytes."
                    )
                if end < 0:
                    return out
                line_end = buf.find(_CRLF, n)
                if buf[n:line_end].strip(b" \t"):
                    raise errors.invalid_multipart("Malformed multipart boundary line.")
                self._end_part(out)
                self._start_part(bytes(buf[line_end + 2:end + 2]))
                self._emit(out, buf[:end + 4])
                del buf[:end + 4]
                self._state = _DATA

    def close(self) -> list[Piece]:
        """The body has ended: return what is left, or raise if it was not a whole body."""
        if self._state != _EPILOGUE:
            if not self.parts:
                raise errors.invalid_multipart("The body holds no part with the boundary from Content-Type.")
            raise errors.invalid_multipart("The multipart body ended before its closing boundary.")
        return []

    def _start_part(self, head: bytes) -> None:
        self.parts += 1
        name, _ = disposition(head)
        if name in self._capture:
            if name in self.seen:
                raise errors.invalid_multipart(f"The '{name}' field appears more than once.")
            self._current = name
            self._value.clear()
        if name == FILE or name in self._capture:
            self.seen.add(name)  # type: ignore[arg-type]

    def _end_part(self, out: list[Piece]) -> None:
        if self._current is not None:
            out.append(Field(self._current, bytes(self._value)))
            self._current = None
            self._value.clear()

    def _check_complete(self) -> None:
        if MODEL not in self.seen:
            raise errors.missing_model()
        if FILE not in self.seen:
            raise errors.missing_file()

    def _sink(self, out: list[Piece], chunk: bytearray) -> None:
        if self._current is None:
            self._emit(out, chunk)
            return
        if len(self._value) + len(chunk) > self._max_value:
            raise errors.invalid_multipart(f"The '{self._current}' field is over {self._max_value} bytes.")
        self._value += chunk

    def _emit(self, out: list[Piece], chunk: bytearray) -> None:
        if self._drop:
            cut = min(self._drop, len(chunk))
            self._drop -= cut
            chunk = chunk[cut:]
        if chunk:
            out.append(chunk)


def _prefix_start(buf: bytearray, delim: bytes) -> int:
    """Where the tail of buf that could begin a delimiter starts (len(buf) when none could)."""
    n = len(buf)
    j = buf.find(b"\r", max(0, n - len(delim) + 1))
    while j >= 0:
        if delim.startswith(buf[j:]):
            return j
        j = buf.find(b"\r", j + 1)
    return n
