"""Coverage-guided fuzzing of the multipart rewriter (aisix/multipart.py) with atheris.

Run it with ``make soak-fuzz`` (see fuzz/README.md), or directly:

    .venv/bin/python fuzz/fuzz_multipart.py fuzz/corpus -max_total_time=120

One fuzz input is ``[config byte][chunking seed byte][body...]``:

- config bits 0-2: the boundary, one of ``BOUNDARIES``;
- config bits 3-4: the caps (header block, captured value), one of ``CAPS`` (small caps let
  short inputs reach the over-cap paths);
- config bits 5-7: how the body is cut into chunks (``cuts_of``);
- the seed byte drives the chunk sizes.

For every input, ``check()`` asserts:

1. only ``GatewayError`` with status 400 (``invalid_multipart``, ``missing_model``,
   ``missing_file``) ever leaves the rewriter;
2. after every ``feed()``, the held state is bounded: ``len(_buf) <= max(max_head + 2,
   len(CRLF--boundary) + 1)`` and ``len(_value) <= max_value``;
3. the bytes forwarded so far (a ``Field`` counted as its own value) are always a prefix of
   the body, and the whole body once it completes;
4. the body fed in one chunk and in the chosen chunks gives the same outcome: the same output
   and ``Field`` events, or the same error code;
5. the outcome agrees with ``reference()``, a plain whole-body parser written from the (strict)
   rules in the module's docstring, with its own header parser: the same error code, or the
   same fields at the same offsets (the model value is replaced by a marker and the output
   compared to the body with that span swapped);
6. when the rewriter rejects a body, what it has forwarded is not a complete body by the
   reference, and is shorter than the body: an upstream never receives a whole request that
   the gateway refused, nor every byte a Content-Length promised;
7. when it accepts a body, aiohttp's MultipartReader (the reader of aisix.devupstream) refuses
   it, finds no model, or finds exactly the model value the rewriter reported: never a hidden
   model the gateway did not check (``AISIX_FUZZ_AIOHTTP=0`` turns this off);
8. framing: when it accepts a body, the request the gateway would send upstream (the caller's
   Content-Length adjusted by the size difference of the model value, then the rewritten
   bytes) ends exactly where it says, so the next request on that keep-alive connection is
   read from its first byte (``next_request_intact``).

This file doubles as a library: tests/test_multipart_properties.py loads it to replay the
corpus and to use ``reference()``. atheris is only imported when it runs as a script.
"""

from __future__ import annotations

import os
import pathlib
import random
import sys
import warnings

# Run as a script from anywhere: the repository root holds the aisix package.
_ROOT = str(pathlib.Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from aisix import errors  # noqa: E402
from aisix.multipart import FILE, MODEL, Field, Rewriter  # noqa: E402

BOUNDARIES = (
    b"B",
    b"-",
    b"ab",
    b"--",
    b"x-y",
    b"----aisixFuzz",
    b"a b",
    b"0123456789" * 7,  # the longest RFC 2046 allows
)
CAPS = ((16 * 1024, 64 * 1024), (48, 8), (128, 32), (16 * 1024, 64 * 1024))
CODES = frozenset({"invalid_multipart", "missing_model", "missing_file"})
# Check accepted bodies against aiohttp's reader too (AISIX_FUZZ_AIOHTTP=0 turns it off).
DIFFERENTIAL = os.environ.get("AISIX_FUZZ_AIOHTTP", "1") != "0"
MARK = b"<<MODEL>>"
UPSTREAM_MODEL = b"upstream-model-id"  # what the gateway writes in the model value's place


class RefError(Exception):
    """The reference's rejection; ``code`` is the GatewayError code the rewriter should give."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
OWS = b" \t"


def ref_disposition(head: bytes) -> str:
    """The form field name of a part's header block (CRLF-ended lines), or RefError.

    Written byte by byte from the module docstring, independently of ``disposition()``: every
    line is ``token ":" [SP/HT]* value`` with no CR or LF in it; exactly one line is
    ``Content-Disposition`` (any case); its value is ``form-data`` (any case), then parameters
    ``; token = (token | quoted-string)`` with spaces/tabs allowed around each piece, no key
    twice (any case), none starting ``name*``, and a ``name`` that is not ``model``, ``prompt``
    or ``file`` in another case (casefolded); a ``Content-Transfer-Encoding`` line other than
    7bit, 8bit or binary is refused. In a quoted string a backslash takes the next character as
    it is; raw CR, LF and unescaped quotes end or break it.
    """
    bad = RefError("invalid_multipart")
    assert head == b"" or head.endswith(b"\r\n")
    lines = head.split(b"\r\n")[:-1]
    found = None
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise bad
        colon = line.find(b":")
        key = line[:colon] if colon > 0 else b""
        if not key or any(c not in TOKEN for c in key):
            raise bad
        if key.lower() == b"content-disposition":
            if found is not None:
                raise bad
            found = line[colon + 1:].lstrip(OWS)
        elif key.lower() == b"content-transfer-encoding" and \
                line[colon + 1:].strip(b" \t").lower() not in (b"7bit", b"8bit", b"binary"):
            raise bad  # a coding another reader would decode
    if found is None:
        raise bad
    text = found.decode("utf-8", "replace")
    at, size = 0, len(text)

    def skip_ows(at: int) -> int:
        while at < size and text[at] in " \t":
            at += 1
        return at

    def token(at: int) -> tuple[str, int]:
        begin = at
        while at < size and ord(text[at]) < 128 and ord(text[at]) in TOKEN:
            at += 1
        if at == begin:
            raise bad
        return text[begin:at], at

    kind_end = text.find(";")
    kind_end = size if kind_end < 0 else kind_end
    if text[:kind_end].strip(" \t").lower() != "form-data":
        raise bad
    at = kind_end
    params: dict[str, str] = {}
    while at < size:
        at = skip_ows(at)
        if at == size:
            break  # trailing spaces after the last parameter
        if text[at] != ";":
            raise bad
        key, at = token(skip_ows(at + 1))
        at = skip_ows(at)
        if at == size or text[at] != "=":
            raise bad
        at = skip_ows(at + 1)
        if at < size and text[at] == '"':
            value, at = [], at + 1
            while True:
                if at == size:
                    raise bad
                c = text[at]
                if c == '"':
                    at += 1
                    break
                if c == "\\":
                    if at + 1 == size:
                        raise bad
                    value.append(text[at + 1])
                    at += 2
                    continue
                value.append(c)
                at += 1
            val = "".join(value)
        else:
            val, at = token(at)
        key = key.lower()
        if key in params or key.startswith("name*"):  # RFC 2231's name*, name*0, name*0* ...
            raise bad
        params[key] = val
    if "name" not in params:
        raise bad
    name = params["name"]
    if name.casefold() != name and name.casefold() in (MODEL, "prompt", FILE):
        raise bad  # a name the gateway reads, in another case: another reader's second value
    return name


def reference(
    body: bytes,
    boundary: bytes,
    max_head: int = 16 * 1024,
    max_value: int = 64 * 1024,
    capture: frozenset[str] = frozenset({MODEL}),
    heads: list[int] | None = None,
) -> list[tuple[str, int, int]]:
    """The captured fields of a whole body as (name, start, end) offsets into it, or RefError.
    When heads is given, the size of each part's header block is appended to it.

    Written from the module docstring's (strict) rules, not from the streaming code: the body
    starts with ``--boundary`` (a virtual CRLF in front makes it the first delimiter);
    ``CRLF--boundary`` is always a delimiter, followed by ``--`` (the close; anything after is
    epilogue) or by spaces/tabs and CRLF (a part), anything else is a 400, and so is a body that
    ends before two bytes follow it. A part's header block runs from the delimiter's ``--`` to
    the blank line, included, capped at max_head, must not hold ``CRLF--boundary`` (that is
    always a delimiter) and must pass ``ref_disposition()``; its data
    must not start with ``--boundary``; a captured value is capped at max_value.
    """
    bad = RefError("invalid_multipart")
    delim = b"\r\n--" + boundary
    n = len(delim)
    data = b"\r\n" + body
    if not data.startswith(delim):
        raise bad
    fields: list[tuple[str, int, int]] = []
    seen: set[str] = set()
    current: str | None = None
    start = i = 0
    while True:  # a delimiter at data[i:]
        if current is not None:
            if i - start > max_value:
                raise bad
            fields.append((current, start - 2, i - 2))
            current = None
        after = data[i + n:i + n + 2]
        if len(after) < 2:
            raise bad
        if after == b"--":
            if MODEL not in seen:
                raise RefError("missing_model")
            if FILE not in seen:
                raise RefError("missing_file")
            return fields
        if after[0] not in b" \t\r":
            raise bad
        end = data.find(b"\r\n\r\n", i + n)
        if end < 0 or end + 4 - (i + 2) > max_head:
            raise bad
        line_end = data.find(b"\r\n", i + n)
        if data[i + n:line_end].strip(b" \t"):
            raise bad
        if data.find(delim, line_end, end + 2) >= 0:  # CRLF--boundary is always a delimiter
            raise bad
        if heads is not None:
            heads.append(end + 4 - (i + 2))
        name = ref_disposition(data[line_end + 2:end + 2])
        if name in capture:
            if name in seen:
                raise bad
            current = name
        if name == FILE or name in capture:
            seen.add(name)
        start = end + 4
        if data.startswith(delim[2:], start):
            raise bad
        i = data.find(delim, start)
        if i < 0:
            raise bad


def buf_bound(boundary: bytes, max_head: int) -> int:
    """The most ``Rewriter._buf`` may hold between two feeds: a header block (from the
    delimiter's ``--``, so +2 for its CRLF) or a delimiter and one byte of look-ahead."""
    return max(max_head + 2, len(boundary) + 4 + 1)


class Outcome:
    """What one run of the rewriter produced."""

    __slots__ = ("out", "raw", "wire", "fields", "code", "status")

    def __init__(self) -> None:
        self.out = bytearray()   # the forwarded bytes, the model value replaced by MARK
        self.raw = bytearray()   # the forwarded bytes, every Field counted as its own value
        self.wire = bytearray()  # what the upstream gets: the model value replaced by UPSTREAM_MODEL
        self.fields: list[Field] = []
        self.code: str | None = None
        self.status: int | None = None

    def key(self) -> tuple:
        # On a rejection, how much was forwarded before it depends on the chunks (and the
        # pieces of the feed() that raised are lost): only the code is comparable.
        if self.code is not None:
            return (self.code,)
        return bytes(self.out), self.fields


def run(
    boundary: bytes,
    chunks: list[bytes],
    max_head: int = 16 * 1024,
    max_value: int = 64 * 1024,
    capture: frozenset[str] = frozenset({MODEL}),
    body: bytes | None = None,
) -> Outcome:
    """Feed the chunks then close, asserting the bounds after every feed and, when the body is
    given, that what was forwarded is always a prefix of it."""
    rw = Rewriter(boundary, capture=capture, max_head=max_head, max_value=max_value)
    bound = buf_bound(boundary, max_head)
    res = Outcome()

    def take(pieces: list) -> None:
        for p in pieces:
            if isinstance(p, Field):
                res.fields.append(p)
                res.out += MARK if p.name == MODEL else p.value
                res.wire += UPSTREAM_MODEL if p.name == MODEL else p.value
                raw = p.value
            else:
                assert isinstance(p, (bytes, bytearray, memoryview)), type(p)
                res.out += p
                res.wire += p
                raw = p
            if body is not None:
                at = len(res.raw)
                assert body[at:at + len(raw)] == raw, f"forwarded bytes differ from the body at {at}"
            res.raw += raw

    try:
        for chunk in chunks:
            take(rw.feed(chunk))
            assert len(rw._buf) <= bound, f"_buf holds {len(rw._buf)} > {bound}"
            assert len(rw._value) <= max_value, f"_value holds {len(rw._value)} > {max_value}"
        take(rw.close())
    except errors.GatewayError as e:
        assert e.status == 400 and e.code in CODES, repr(e)
        res.code, res.status = e.code, e.status
    return res


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(c for c in cuts if 0 < c < len(body)), len(body)]
    return [body[a:b] for a, b in zip(points, points[1:])]


def cuts_of(mode: int, seed: int, size: int) -> list[int]:
    """Chunk boundaries for a body of the given size: 0 one chunk, 1 a byte at a time, 2-7
    random chunks of 1..4**(mode-1) bytes (small ones exercise every split point)."""
    if mode == 0 or size == 0:
        return []
    if mode == 1:
        return list(range(1, size))
    rnd = random.Random(seed)
    top = 4 ** (mode - 1)
    cuts, at = [], 0
    while True:
        at += rnd.randint(1, top)
        if at >= size:
            return cuts
        cuts.append(at)


class _Protocol:
    """The least of a protocol aiohttp's StreamReader calls back into."""

    _reading_paused = False

    def pause_reading(self, **_: object) -> None:
        pass

    def resume_reading(self, **_: object) -> None:
        pass


_loop = None


def aiohttp_models(body: bytes, boundary: bytes) -> list[bytes] | None:
    """The values of every ``model`` part aiohttp's MultipartReader reads in body (what
    aisix.devupstream and any aiohttp upstream would see), or None when it refuses the body."""
    global _loop
    import asyncio

    from aiohttp import MultipartReader, streams

    async def read() -> list[bytes] | None:
        content = streams.StreamReader(_Protocol(), 2**16, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
        content.feed_data(body)
        content.feed_eof()
        ctype = 'multipart/form-data; boundary="' + boundary.decode() + '"'
        reader = MultipartReader({"Content-Type": ctype}, content)
        models = []
        try:
            while (part := await reader.next()) is not None:
                value = bytes(await part.read())  # type: ignore[union-attr]
                if part.name == MODEL:  # type: ignore[union-attr]
                    models.append(value)
        except Exception:  # noqa: BLE001  (any refusal by aiohttp is fine: the upstream fails)
            return None
        return models

    if _loop is None:
        _loop = asyncio.new_event_loop()
    with warnings.catch_warnings():  # aiohttp warns on dispositions it cannot parse
        warnings.simplefilter("ignore")
        return _loop.run_until_complete(read())


def expected_output(body: bytes, spans: list[tuple[str, int, int]]) -> bytes:
    out, at = bytearray(), 0
    for name, s, e in spans:
        if name == MODEL:
            out += body[at:s] + MARK
            at = e
    return bytes(out + body[at:])


NEXT_REQUEST = b"POST /v1/audio/speech HTTP/1.1\r\nHost: upstream\r\nContent-Length: 2\r\n\r\n{}"


def next_request_intact(body: bytes, outcome: Outcome) -> bool:
    """One keep-alive connection as the upstream reads it: this request, framed by the length
    the gateway declares (the caller's, adjusted for the model value), then the next request.
    What is left after reading the declared length must be the next request, whole."""
    old = b"".join(f.value for f in outcome.fields if f.name == MODEL)
    declared = len(body) + len(UPSTREAM_MODEL) - len(old)
    wire = bytes(outcome.wire) + NEXT_REQUEST
    return wire[declared:] == NEXT_REQUEST


def check(
    boundary: bytes,
    body: bytes,
    cuts: list[int],
    max_head: int = 16 * 1024,
    max_value: int = 64 * 1024,
) -> Outcome:
    """All the invariants for one body and one way of cutting it; returns the chunked outcome."""
    kw = dict(max_head=max_head, max_value=max_value, body=body)
    whole = run(boundary, [body], **kw)
    chunked = run(boundary, split(body, cuts), **kw)
    assert whole.key() == chunked.key(), (
        f"one chunk vs chunked differ: {whole.code!r}/{chunked.code!r}, "
        f"{whole.fields!r}/{chunked.fields!r}"
    )
    try:
        spans = reference(body, boundary, max_head, max_value)
    except RefError as e:
        assert chunked.code == e.code, f"reference rejects with {e.code}, rewriter gave {chunked.code!r}"
        # What went upstream must not be a complete body.
        try:
            reference(bytes(chunked.raw), boundary, max_head, max_value)
        except RefError:
            pass
        else:
            raise AssertionError("a rejected body was forwarded complete") from None
        assert not chunked.raw or len(chunked.raw) < len(body), "a rejected body was forwarded to its last byte"
        return chunked
    assert chunked.code is None, f"reference accepts, rewriter rejected with {chunked.code}"
    assert bytes(chunked.raw) == body
    assert [f.name for f in chunked.fields] == [name for name, _, _ in spans]
    assert [f.value for f in chunked.fields] == [body[s:e] for _, s, e in spans]
    assert bytes(chunked.out) == expected_output(body, spans)
    assert next_request_intact(body, chunked), "the rewritten body does not end where its length says"
    if DIFFERENTIAL:
        # aiohttp may refuse the body or miss the model (the upstream then fails the request),
        # but any model value it reads must be the one the gateway checked and rewrites.
        models = aiohttp_models(body, boundary)
        reported = [f.value for f in chunked.fields if f.name == MODEL]
        assert models is None or models in ([], reported), f"aiohttp reads model {models!r}, the rewriter {reported!r}"
    return chunked


def decode(data: bytes) -> tuple[bytes, int, int, list[int], bytes]:
    """(boundary, max_head, max_value, cuts, body) from one fuzz input."""
    if len(data) < 2:
        data = data.ljust(2, b"\0")
    config, seed, body = data[0], data[1], data[2:]
    boundary = BOUNDARIES[config & 7]
    max_head, max_value = CAPS[(config >> 3) & 3]
    return boundary, max_head, max_value, cuts_of(config >> 5, seed, len(body)), body


def encode(body: bytes, boundary_index: int = 5, caps: int = 0, mode: int = 0, seed: int = 0) -> bytes:
    """The fuzz input for a body (used to write the seed corpus)."""
    return bytes([boundary_index | caps << 3 | mode << 5, seed]) + body


def test_one_input(data: bytes) -> None:
    boundary, max_head, max_value, cuts, body = decode(data)
    check(boundary, body, cuts, max_head, max_value)


def main() -> None:
    import atheris

    # Instrument what is already loaded: the rewriter and the reference above.
    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
