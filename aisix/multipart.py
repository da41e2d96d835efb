"""Sans-IO multipart/form-data rewriter: passes every byte through except captured field values.

[core] Bytes in, pieces out, no I/O. It holds at most one part header block (16 KiB by default),
one captured value (64 KiB) and a delimiter's length of tail, whatever the body size.

``feed()`` returns the body as a list of pieces in order: byte chunks to forward as they are,
and a ``Field`` where a captured field's value stood. The value itself is withheld: the caller
writes whatever belongs in its place (the upstream model id for ``model``; the same bytes for a
field it only wanted to read). The closing delimiter is released only once the body is known to
hold a ``model`` and a ``file`` part, so an upstream can never receive a complete request that
the gateway rejects.

Strict on purpose. The gateway checks one ``model`` value and the provider's parser must read the
same one; parsers disagree on malformed layouts (bare LF line ends, obs-folded headers, RFC 2231
``name*``, non-form-data dispositions, a preamble, part data that starts with the boundary, a
delimiter followed by junk), so a caller could hide a second model value in them. Every such
layout is a 400, never forwarded: a correct encoder (browsers, curl, every SDK) produces none.
The body starts with ``--boundary``; ``CRLF--boundary`` is always a delimiter and must be followed
by ``--`` or by optional spaces/tabs and CRLF; each part has CRLF-ended ``name: value`` header
lines and exactly one ``Content-Disposition: form-data`` with exactly one ``name``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import stringzilla

from . import errors

MODEL = "model"
FILE = "file"

_CRLF = b"\r\n"
_BLANK = b"\r\n\r\n"
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN_RE = re.compile(_TOKEN)
# RFC 2046: 1 to 70 of these, not ending in a space.
_BCHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_HEADER_LINE = re.compile(rb"(" + _TOKEN.encode() + rb"):[ \t]*(.*)")
_PARAM = re.compile(r'[ \t]*;[ \t]*(' + _TOKEN + r')[ \t]*=[ \t]*("(?:[^"\\\r\n]|\\.)*"|' + _TOKEN + r')[ \t]*')
_QUOTED_PAIR = re.compile(r"\\(.)")
# The usual part head, and nothing the full parser reads otherwise: one Content-Disposition with
# a plain name (no escapes) and maybe a filename without escapes, then maybe a Content-Type.
_PLAIN_HEAD = re.compile(
    rb'Content-Disposition: form-data; name="([A-Za-z0-9_.\-]{1,64})"(; filename="[^"\\\r\n]*")?\r\n'
    rb'(?:Content-Type: [^\r\n]*\r\n)?'
)

# Parser states.
_DATA, _DELIM, _HEAD, _EPILOGUE = range(4)


@dataclass(frozen=True, slots=True)
class Field:
    """A captured form field, in the place its value had in the body."""

    name: str
    value: bytes


Piece = bytes | bytearray | memoryview | Field
# Text fields between the model and the file that Rewriter._prologue reads; more go to the
# state machine.
_PROLOGUE_FIELDS = 14
# The most the state machine copies from one feed() at a time. Small, because the usual part
# heads fit in it and the file bytes after them are better left to _pass (no copy): at 16 KiB the
# first chunk's file bytes were copied twice and searched by bytes.find (about 13 us of CPU per
# 256 KiB upload in `make bench-ab`).
_WINDOW = 1024
# bytes.find, with SIMD: the same results (checked against it on random inputs), 4x faster on
# file bytes (256 KiB: 29 -> 7.6 us), and every byte of every upload goes through it.
_find = stringzilla.find


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type, or a 400.

    Parameters are read by the RFC 2045 grammar (token or quoted-string values), never searched
    for: a ``boundary=`` inside another parameter's quoted value is not the boundary. A repeated
    or malformed parameter is refused, and the upstream is sent ``content_type_for(boundary)``,
    so no reader can split the body on another boundary than the gateway did."""
    media, sep, params = content_type.partition(";")
    if media.strip(" \t").lower() != "multipart/form-data":
        raise errors.unsupported_content_type("multipart/form-data")
    boundary = _parameters(sep + params, "Content-Type").get("boundary", "")
    if not _BCHARS.fullmatch(boundary):
        raise errors.invalid_multipart("Content-Type has no valid multipart boundary.")
    return boundary.encode("ascii")


def _parameters(text: str, header: str) -> dict[str, str]:
    """``; key=value`` pairs (token or quoted-string values, unescaped), keys lower-cased; a 400
    for anything else, or for a key given twice."""
    values: dict[str, str] = {}
    at = 0
    while at < len(text):
        m = _PARAM.match(text, at)
        if m is None or m.group(1).lower() in values:
            raise errors.invalid_multipart(f"Malformed or repeated {header} parameters.")
        raw = m.group(2)
        if raw.startswith('"'):
            raw = _QUOTED_PAIR.sub(r"\1", raw[1:-1]) if "\\" in raw else raw[1:-1]
        values[m.group(1).lower()] = raw
        at = m.end()
    return values


def content_type_for(boundary: bytes) -> str:
    """The Content-Type the upstream gets: the media type and the boundary, nothing else."""
    b = boundary.decode("ascii")
    return f"multipart/form-data; boundary={b}" if _TOKEN_RE.fullmatch(b) else f'multipart/form-data; boundary="{b}"'


def disposition(head: bytes) -> tuple[str, bool]:
    """(form field name, has a filename) from a part's header block, each line CRLF-ended; a 400
    for anything two parsers could read differently."""
    m = _PLAIN_HEAD.fullmatch(head)
    if m is not None:  # what the SDKs, curl and browsers send, read as the full parser would
        return _checked(m.group(1).decode("ascii")), m.group(2) is not None
    found = None
    for line in head.split(_CRLF)[:-1]:
        m = _HEADER_LINE.fullmatch(line)
        if m is None or b"\r" in line or b"\n" in line:  # also obs-fold, bare CR or LF
            raise errors.invalid_multipart("Malformed part header line.")
        if m.group(1).lower() == b"content-disposition":
            if found is not None:
                raise errors.invalid_multipart("A part has more than one Content-Disposition.")
            found = m.group(2).decode("utf-8", "replace")
        elif m.group(1).lower() == b"content-transfer-encoding" and \
                m.group(2).strip(b" \t").lower() not in (b"7bit", b"8bit", b"binary"):
            # RFC 7578 (4.7) deprecates it; readers that decode it (Go's quoted-printable,
            # python-multipart's base64 too) would get a value other than the one screened or measured.
            raise errors.invalid_multipart("A part has a Content-Transfer-Encoding.")
    if found is None:
        raise errors.invalid_multipart("A part has no Content-Disposition.")
    kind, sep, params = found.partition(";")
    if kind.strip(" \t").lower() != "form-data":
        raise errors.invalid_multipart("A part's Content-Disposition is not form-data.")
    values = _parameters(sep + params, "Content-Disposition")
    # RFC 7578 forbids RFC 2231's extended names; readers that decode them see another name than
    # ``name``: ``name*=`` (Python's email), and continuations ``name*0=``, ``name*0*=`` ..., which
    # Go's mime.ParseMediaType stitches into ``name`` over the plain parameter.
    if any(key.startswith("name*") for key in values):
        raise errors.invalid_multipart("Ambiguous Content-Disposition parameters.")
    if "name" not in values:
        raise errors.invalid_multipart("A part's Content-Disposition has no name.")
    return _checked(values["name"]), "filename" in values or "filename*" in values


# Names the gateway reads (the alias, the prompt it screens, the file it measures): a part named
# one of them in another case is refused.
_READ_NAMES = frozenset({MODEL, "prompt", FILE})


def _checked(name: str) -> str:
    """A part's name, refused when it is ``model``, ``prompt`` or ``file`` in another case: readers
    that match names without case (ASP.NET's form collection) would read a second model value the
    gateway never checked, a prompt it never screened, a file it never measured."""
    folded = name.casefold()
    if folded != name and folded in _READ_NAMES:
        raise errors.invalid_multipart(f"A part's name differs from '{folded}' only in case.")
    return name


class Rewriter:
    """One multipart body, fed in chunks of any size."""

    __slots__ = (
        "_delim", "_buf", "_state", "_drop", "_max_head", "_max_value",
        "_capture", "_current", "_value", "_scanned", "_fresh", "_last", "_in_file", "seen", "parts", "on_file",
        "model",
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
        self._fresh = True  # at the start of part data (or of the body): "--boundary" may not follow
        self._last = b""  # the last byte given out so far, held back until the closing delimiter
        self.seen: set[str] = set()  # captured names and "file", as met
        self.parts = 0
        self._in_file = False  # the part being read is the file
        # The model value once its part ended, kept even when the same chunk then ends the form
        # with an error (no file): the caller's alias is still recorded.
        self.model: bytes | None = None
        # Given the file part's data as it is known to be data (never a delimiter's bytes), in
        # order, without a copy: a memoryview of the caller's chunk or a piece of the buffer.
        self.on_file: Callable[[bytes | bytearray | memoryview], None] | None = None

    def feed(self, data: bytes | bytearray) -> list[Piece]:
        out = self._feed(data)
        # Until the closing delimiter, the last byte given out is held back: a truncated form
        # (which close() refuses) then never reaches the upstream whole, whatever its length.
        held = self._last
        if self._state == _EPILOGUE:
            if held:
                self._last = b""
                out.insert(0, held)
            return out
        if out:
            if held:
                out.insert(0, held)
                self._last = b""
            tail = out[-1]
            if not isinstance(tail, Field):  # a Field is never last: the delimiter after it is held
                self._last = bytes(tail[-1:])
                if len(tail) > 1:
                    out[-1] = memoryview(tail)[:-1]
                else:
                    out.pop()
        return out

    def _feed(self, data: bytes | bytearray) -> list[Piece]:
        out: list[Piece] = []
        if self._state == _EPILOGUE:
            if data:
                out.append(data)
            return out
        # File bytes go through _pass without a copy; everything else (heads, captured values,
        # delimiters) through the state machine, at most a window at a time, so a whole body
        # that arrives in one read is not copied whole into the buffer.
        start, n = 0, len(data)
        if not self.parts and len(self._buf) == 2 and isinstance(data, bytes):  # nothing read yet
            start = self._prologue(out, data)
        while start < n:
            if self._state == _EPILOGUE:  # the closing delimiter was in an earlier window
                out.append(data[start:])
                break
            if self._state == _DATA and not self._fresh and self._current is None:
                start = self._pass(out, data, start)
                if start >= n:
                    break
            end = n if n - start <= _WINDOW else start + _WINDOW
            self._general(out, data if start == 0 and end == n else data[start:end])
            start = end
        return out

    def _general(self, out: list[Piece], data: bytes | bytearray) -> None:
        buf = self._buf
        delim = self._delim
        buf += data
        while True:
            state = self._state
            if state == _DATA:
                if self._fresh and not self._check_fresh(buf):
                    return
                i = buf.find(delim)
                if i < 0:
                    keep = _prefix_start(buf, delim)
                    if keep:
                        self._sink(out, buf[:keep])
                        del buf[:keep]
                    return
                if i:
                    self._sink(out, buf[:i])
                    del buf[:i]
                self._state = _DELIM
            elif state == _DELIM:
                n = len(delim)
                if len(buf) < n + 2:
                    return
                after = buf[n]
                if after == 0x2D and buf[n + 1] == 0x2D:  # "--": the closing delimiter
                    self._end_part(out)
                    self._check_complete()
                    self._emit(out, buf[:])
                    buf.clear()
                    self._state = _EPILOGUE
                    return
                if after not in (0x20, 0x09, 0x0D):
                    raise errors.invalid_multipart("Malformed multipart boundary line.")
                self._state = _HEAD
                self._scanned = 0
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
                    return
                line_end = buf.find(_CRLF, n)
                if buf[n:line_end].strip(b" \t"):
                    raise errors.invalid_multipart("Malformed multipart boundary line.")
                if buf.find(delim, line_end, end + 2) >= 0:  # CRLF--boundary is always a delimiter
                    raise errors.invalid_multipart("A part header block holds the boundary.")
                self._end_part(out)
                self._start_part(bytes(buf[line_end + 2:end + 2]))
                self._emit(out, buf[:end + 4])
                del buf[:end + 4]
                self._state = _DATA
                self._fresh = True

    def _prologue(self, out: list[Piece], data: bytes) -> int:
        """The usual start of a body, whole in its first chunk: a ``model`` part, maybe text
        fields (the SDKs send ``language``, ``response_format`` ... there), then the ``file``
        part's head, each head as _PLAIN_HEAD reads it. Read here as the state machine
        would read it (the same pieces, fields, state and checks), at a fraction of its cost;
        where the file's bytes start, or 0 (nothing done) for anything else, which the state
        machine then reads as always."""
        delim = self._delim
        dash = delim[2:]
        if MODEL not in self._capture or FILE in self._capture:
            return 0
        line, at = 0, len(dash) + 2  # where a part's boundary line starts ("--"), and its head
        if not data.startswith(dash) or data[at - 2:at] != _CRLF:
            return 0
        value = end = fields = 0  # the model's value is data[value:end]
        while True:
            # Each search stops at its cap, so a large first chunk of another shape costs no more
            # than the caps before the state machine takes it.
            head = _PLAIN_HEAD.match(data, at, at + self._max_head)
            if head is None or data[head.end():head.end() + 2] != _CRLF:
                return 0
            start = head.end() + 2
            # The head's cap (from "--" to the blank line), part data starting with the boundary.
            if start - line > self._max_head or data.startswith(dash, start):
                return 0
            name = head.group(1)
            if not end:  # the first part
                if name != b"model":
                    return 0
            elif name == b"file":
                break
            else:  # a text field nobody captures (a prompt or a second model: the state machine's)
                fields += 1
                lowered = name.lower()
                if fields > _PROLOGUE_FIELDS or name.decode("ascii") in self._capture or \
                        (lowered != name and lowered.decode("ascii") in _READ_NAMES):  # Model, PROMPT: refused there
                    return 0
            # Found within max_value of its start: the model value's cap (for a field, a bound only).
            i = _find(data, delim, start, start + self._max_value + len(delim))
            if i < 0 or data[i + len(delim):i + len(delim) + 2] != _CRLF:
                return 0
            if not end:
                value, end = start, i
            line, at = i + 2, i + len(delim) + 2
        file = start
        if len(data) - file < len(dash):
            return 0
        self.parts = fields + 2
        self.seen.update((MODEL, FILE))
        self._in_file = True
        self._fresh = False
        self._buf.clear()
        self._drop = 0
        field = Field(MODEL, bytes(data[value:end]))
        self.model = field.value
        out += (data[:value], field, data[end:file])
        return file

    def _pass(self, out: list[Piece], data: bytes | bytearray, start: int) -> int:
        """File bytes from data[start:] up to where a delimiter may start, passed on as they are
        (a memoryview, no copy); where the state machine must go on."""
        delim, buf = self._delim, self._buf
        if buf:  # a delimiter may begin in the held tail and end in data: the state machine's
            if (len(data) - start < len(delim) - 1
                    or (bytes(buf) + bytes(data[start:start + len(delim) - 1])).find(delim) >= 0):
                return start
            self._sink(out, buf[:])
            buf.clear()
        n = len(data)
        i = _find(data, delim, start)  # the one pass over every file byte
        stop = i if i >= 0 else _prefix_start(data, delim, start)
        if stop > start:
            piece: bytes | bytearray | memoryview
            if start == 0 and stop == n:
                piece = data
            elif isinstance(data, bytes):
                piece = memoryview(data)[start:stop]
            else:  # the caller's bytearray may change after feed(): copy it
                piece = bytes(data[start:stop])
            out.append(piece)
            if self._in_file and self.on_file is not None:
                self.on_file(piece)
        if i >= 0:
            return i
        buf += data[stop:]  # shorter than the delimiter
        return n

    def _check_fresh(self, buf: bytearray) -> bool:
        """At the start of the body, or of a part's data: the body must begin with the
        delimiter, and part data must not (others would read it as an empty part). False while
        there are too few bytes to tell."""
        delim = self._delim
        if not self.parts:  # buf holds the virtual CRLF, then the body's first bytes
            if len(buf) < len(delim):
                if not delim.startswith(buf):
                    raise errors.invalid_multipart("The body does not start with the boundary from Content-Type.")
                return False
            if not buf.startswith(delim):
                raise errors.invalid_multipart("The body does not start with the boundary from Content-Type.")
        else:
            dash = delim[2:]
            if len(buf) < len(dash) and dash.startswith(buf):
                return False
            if buf.startswith(dash):
                raise errors.invalid_multipart("Part data starts with the boundary.")
        self._fresh = False
        return True

    def close(self) -> list[Piece]:
        """The body has ended: return what is left, or raise if it was not a whole body."""
        if self._state != _EPILOGUE:
            if not self.parts:
                raise errors.invalid_multipart("The body does not start with the boundary from Content-Type.")
            raise errors.invalid_multipart("The multipart body ended before its closing boundary.")
        return []

    def _start_part(self, head: bytes) -> None:
        self.parts += 1
        name, _ = disposition(head)
        if name in self._capture:
            if name == MODEL and MODEL in self.seen:  # a second model: which one would be used?
                raise errors.invalid_multipart("The 'model' field appears more than once.")
            self._current = name
            self._value.clear()
        if name == FILE or name in self._capture:
            self.seen.add(name)
        self._in_file = name == FILE

    def _end_part(self, out: list[Piece]) -> None:
        self._in_file = False
        if self._current is not None:
            field = Field(self._current, bytes(self._value))
            if field.name == MODEL:
                self.model = field.value
            out.append(field)
            self._current = None
            self._value.clear()

    def _check_complete(self) -> None:
        if MODEL not in self.seen:
            raise errors.missing_model()
        if FILE not in self.seen:
            raise errors.missing_file()

    def _sink(self, out: list[Piece], chunk: bytearray) -> None:
        """Part data."""
        if self._current is None:
            if self._in_file and self.on_file is not None and chunk:
                self.on_file(chunk)
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


def _prefix_start(buf: bytes | bytearray, delim: bytes, start: int = 0) -> int:
    """Where the tail of buf[start:] that could begin a delimiter starts (len(buf) when none
    could)."""
    n = len(buf)
    j = buf.find(b"\r", max(start, n - len(delim) + 1))
    while j >= 0:
        if delim.startswith(buf[j:]):
            return j
        j = buf.find(b"\r", j + 1)
    return n
