"""The multipart rewriter as plain functions: bytes in, bytes out, no sockets."""

from __future__ import annotations

import itertools

import pytest

from aisix import errors
from aisix.multipart import Field, Rewriter, boundary_of, content_type_for, disposition

B = b"----aisixTestBoundary7MA4YWxk"


def part(name: str, value: bytes, filename: str | None = None, ctype: str | None = None) -> bytes:
    disp = f'Content-Disposition: form-data; name="{name}"'
    if filename is not None:
        disp += f'; filename="{filename}"'
    head = disp + "\r\n" + (f"Content-Type: {ctype}\r\n" if ctype else "")
    return b"--" + B + b"\r\n" + head.encode() + b"\r\n" + value + b"\r\n"


def body(*parts: bytes, epilogue: bytes = b"\r\n") -> bytes:
    return b"".join(parts) + b"--" + B + b"--" + epilogue


def rewrite(data: bytes, chunks: list[int] | None = None, replacement: bytes = b"whisper-1",
            capture: frozenset[str] = frozenset({"model"})) -> tuple[bytes, list[Field]]:
    """Run the rewriter over data cut at the given offsets; return the output and the fields."""
    rw = Rewriter(B, capture=capture)
    cuts = [0, *(chunks or []), len(data)]
    out, fields = bytearray(), []
    pieces = []
    for a, b in zip(cuts, cuts[1:]):
        pieces += rw.feed(data[a:b])
    pieces += rw.close()
    for p in pieces:
        if isinstance(p, Field):
            fields.append(p)
            out += replacement if p.name == "model" else p.value
        else:
            out += p
    return bytes(out), fields


AUDIO = bytes(range(256)) * 3
MODEL_FIRST = body(part("model", b"whisper-prod"), part("file", AUDIO, "a.wav", "audio/wav"),
                   part("response_format", b"json"))
FILE_FIRST = body(part("file", AUDIO, "a.wav", "audio/wav"), part("model", b"whisper-prod"),
                  part("timestamp_granularities[]", b"word"), part("timestamp_granularities[]", b"segment"))


def swapped(data: bytes) -> bytes:
    return data.replace(b'name="model"\r\n\r\nwhisper-prod', b'name="model"\r\n\r\nwhisper-1')


@pytest.mark.parametrize("data", [MODEL_FIRST, FILE_FIRST], ids=["model-first", "file-first"])
def test_every_split_offset_gives_the_same_output(data: bytes) -> None:
    expected = swapped(data)
    for i in range(len(data) + 1):
        out, fields = rewrite(data, [i])
        assert out == expected, f"split at {i}"
        assert fields == [Field("model", b"whisper-prod")]


@pytest.mark.parametrize("data", [MODEL_FIRST, FILE_FIRST], ids=["model-first", "file-first"])
def test_byte_at_a_time_and_two_splits(data: bytes) -> None:
    expected = swapped(data)
    assert rewrite(data, list(range(1, len(data))))[0] == expected
    for i in range(0, len(data), 7):
        for j in range(i, len(data), 53):
            assert rewrite(data, [i, j])[0] == expected


BOUNDARY_LIKE = [
    b"x--" + B + b"\r\n",               # the boundary without its CRLF, mid-line
    b"\n--" + B + b"X",                  # after a bare LF, followed by a boundary char
    b"\r\n--" + B[:-1],                 # a prefix of the delimiter
    b"\r\n-" + B,                       # one dash short
    b"x\r\n--" + B[:10] + b"\r\n--",    # several partial matches
    b"\r",                              # a file ending in CR
    b"\r\n",                            # a file ending in CRLF
    b"\r\n\r\n\r\n",                    # blank lines
    b"",                                # an empty file
]


@pytest.mark.parametrize("content", BOUNDARY_LIKE)
def test_file_bytes_that_look_like_a_boundary_pass_through(content: bytes) -> None:
    data = body(part("file", content, "x.bin"), part("model", b"whisper-prod"))
    for i in range(len(data) + 1):
        assert rewrite(data, [i])[0] == swapped(data), f"split at {i}"


def test_epilogue_and_padding_pass_through() -> None:
    data = (part("model", b"whisper-prod").replace(B + b"\r\n", B + b" \t\r\n", 1)
            + part("file", b"abc", "a.wav") + b"--" + B + b"--\r\nepilogue")
    for i in range(len(data) + 1):
        assert rewrite(data, [i])[0] == swapped(data)


def cd(name: str) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n'.encode()


HIDDEN = b"hidden-model"
MODEL = part("model", b"whisper-prod")
FILE = part("file", b"RIFF", "a.wav")
END = b"--" + B + b"--\r\n"
# Layouts that some multipart parser reads differently from a strict one: each could hide a model
# value the gateway never checked. All are refused; none comes from a correct encoder.
AMBIGUOUS = {
    "preamble": b"preamble\r\n" + MODEL + FILE + END,
    "preamble-bare-lf": b"x\n--" + B + b"\r\n" + cd("model") + b"\r\n" + HIDDEN + b"\r\n" + MODEL + FILE + END,
    "delimiter-then-junk": FILE[:-2] + b"\r\n--" + B + b"X\r\n" + MODEL + END,
    "delimiter-then-bare-lf": FILE[:-2] + b"\r\n--" + B + b"\n" + cd("model") + b"\n" + HIDDEN + b"\r\n" + MODEL + END,
    "delimiter-one-dash": FILE[:-2] + b"\r\n--" + B + b"-x\r\n" + MODEL + END,
    "header-bare-lf": b"--" + B + b"\r\n" + cd("model") + b"\n" + HIDDEN + b"\r\n--" + B + b"\r\n"
                      + cd("language") + b"\r\nwhisper-prod\r\n" + FILE + END,
    "header-cr-line": b"--" + B + b"\r\n" + cd("model") + b"\r\r\n" + HIDDEN + b"\r\n" + MODEL + FILE + END,
    "obs-fold": b"--" + B + b'\r\nContent-Disposition: form-data;\r\n name="model"\r\n\r\n' + HIDDEN
                + b"\r\n" + MODEL + FILE + END,
    "data-starts-with-boundary": b"--" + B + b"\r\n" + cd("file")[:-2] + b'; filename="a"\r\n\r\n'
                                 + b"--" + B + b"\r\n" + cd("model") + b"\r\n" + HIDDEN + b"\r\n" + MODEL + END,
    "name-star": b"--" + B + b"\r\nContent-Disposition: form-data; name*=UTF-8''model\r\n\r\n" + HIDDEN
                 + b"\r\n" + MODEL + FILE + END,
    "two-names": b"--" + B + b'\r\nContent-Disposition: form-data; name="language"; name="model"\r\n\r\n'
                 + HIDDEN + b"\r\n" + MODEL + FILE + END,
    "two-dispositions": b"--" + B + b"\r\n" + cd("language") + cd("model") + b"\r\n" + HIDDEN + b"\r\n"
                        + MODEL + FILE + END,
    "attachment": b"--" + B + b'\r\nContent-Disposition: attachment; name="model"\r\n\r\n' + HIDDEN
                  + b"\r\n" + MODEL + FILE + END,
    "no-disposition": b"--" + B + b"\r\nContent-Type: text/plain\r\n\r\n" + HIDDEN + b"\r\n" + MODEL + FILE + END,
    "space-before-colon": b"--" + B + b'\r\nContent-Disposition : form-data; name="model"\r\n\r\n' + HIDDEN
                          + b"\r\n" + MODEL + FILE + END,
    "unquoted-junk-param": b"--" + B + b'\r\nContent-Disposition: form-data; name=a b\r\n\r\n' + HIDDEN
                           + b"\r\n" + MODEL + FILE + END,
}


@pytest.mark.parametrize("data", AMBIGUOUS.values(), ids=AMBIGUOUS.keys())
def test_ambiguous_layouts_are_refused(data: bytes) -> None:
    for cuts in ([], [len(data) // 2], list(range(1, len(data), 7))):
        with pytest.raises(errors.GatewayError) as info:
            rewrite(data, cuts)
        assert (info.value.status, info.value.code) == (400, "invalid_multipart")


def test_part_headers_filename_and_repeated_fields_are_kept() -> None:
    data = body(part("model", b"whisper-prod"),
                part("file", b"RIFF", 'we"ird name.wav'.replace('"', "%22"), "audio/x-wav"),
                part("include[]", b"logprobs"), part("include[]", b"other"),
                part("chunking_strategy[type]", b"server_vad"))
    out, _ = rewrite(data)
    assert out == swapped(data)


def test_replacement_of_a_different_length() -> None:
    out, _ = rewrite(MODEL_FIRST, replacement=b"m")
    assert len(out) == len(MODEL_FIRST) - len(b"whisper-prod") + 1


def test_other_captured_fields_are_reported_in_place() -> None:
    data = body(part("file", b"abc", "a.wav"), part("model", b"whisper-prod"), part("prompt", b"a hint"))
    out, fields = rewrite(data, capture=frozenset({"model", "prompt"}))
    assert fields == [Field("model", b"whisper-prod"), Field("prompt", b"a hint")]
    assert out == swapped(data)


def error_of(data: bytes, **kw) -> errors.GatewayError:
    with pytest.raises(errors.GatewayError) as info:
        rewrite(data, **kw)
    return info.value


@pytest.mark.parametrize("data, code", [
    (body(part("file", b"abc", "a.wav")), "missing_model"),
    (body(part("model", b"whisper-prod")), "missing_file"),
    (body(part("model", b"a"), part("model", b"b"), part("file", b"x", "a.wav")), "invalid_multipart"),
    (MODEL_FIRST[:-10], "invalid_multipart"),                              # truncated
    (MODEL_FIRST.replace(B, b"other-boundary"), "invalid_multipart"),      # wrong boundary
    (b"", "invalid_multipart"),
    (body(part("model", b"x" * (64 * 1024 + 1)), part("file", b"x", "a.wav")), "invalid_multipart"),
    (b"--" + B + b"junk\r\n\r\n", "invalid_multipart"),
    (b"--" + B + b"\r\n\r\nvalue\r\n--" + B + b"--", "invalid_multipart"),
], ids=["no-model", "no-file", "two-models", "truncated", "wrong-boundary", "empty", "huge-model", "bad-line",
        "no-headers"])
def test_bad_bodies_raise_the_envelope_error(data: bytes, code: str) -> None:
    err = error_of(data)
    assert err.status == 400 and err.code == code


def test_missing_file_is_known_only_at_the_closing_delimiter() -> None:
    rw = Rewriter(B)
    data = body(part("model", b"whisper-prod"), part("language", b"en"))
    head = data[: data.rindex(b"--" + B + b"--")]
    pieces = rw.feed(head)
    assert Field("model", b"whisper-prod") in pieces
    with pytest.raises(errors.GatewayError) as info:
        rw.feed(data[len(head):])
    assert info.value.code == "missing_file"


def head_of_size(n: int) -> bytes:
    """A part whose header block, from the boundary line's "--" to the blank line, is n bytes."""
    fixed = b"--" + B + b'\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nX-Pad: \r\n\r\n'
    return fixed.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (n - len(fixed)))


def test_header_block_cap_counts_boundary_line_to_blank_line() -> None:
    at_cap = head_of_size(16 * 1024)
    data = at_cap + b"abc\r\n" + part("model", b"whisper-prod") + b"--" + B + b"--"
    assert rewrite(data)[0] == swapped(data)
    over = head_of_size(16 * 1024 + 1) + b"abc\r\n" + part("model", b"whisper-prod") + b"--" + B + b"--"
    err = error_of(over)
    assert err.code == "invalid_multipart" and "header block" in err.message


def test_header_block_cap_applies_before_the_blank_line_arrives() -> None:
    rw = Rewriter(B)
    rw.feed(b"--" + B + b"\r\nX: ")
    with pytest.raises(errors.GatewayError):
        for _ in range(20):
            rw.feed(b"y" * 1024)


def test_memory_held_is_bounded_while_streaming_a_file() -> None:
    rw = Rewriter(B)
    rw.feed(part("model", b"whisper-prod")[:-2])
    rw.feed(b"\r\n--" + B + b'\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n')
    for _ in range(100):
        pieces = rw.feed(b"\x00\r\n-" * 16384)
        assert sum(len(p) for p in pieces if not isinstance(p, Field)) > 60_000
        assert len(rw._buf) < len(B) + 4


@pytest.mark.parametrize("ctype, expected", [
    ("multipart/form-data; boundary=abc", b"abc"),
    ('multipart/form-data; boundary="a b:c"', b"a b:c"),
    ("Multipart/Form-Data; charset=utf-8; boundary=xyz", b"xyz"),
    ('multipart/form-data; note="x;y"; BOUNDARY="q"', b"q"),
    ('multipart/form-data; note="; boundary=decoy;"; boundary=real', b"real"),  # not the one inside quotes
    ("multipart/form-data;boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW", b"----WebKitFormBoundary7MA4YWxkTrZu0gW"),
])
def test_boundary_of(ctype: str, expected: bytes) -> None:
    assert boundary_of(ctype) == expected


@pytest.mark.parametrize("boundary, ctype", [
    (b"abc-123", "multipart/form-data; boundary=abc-123"),
    (b"a b:c", 'multipart/form-data; boundary="a b:c"'),
])
def test_upstream_content_type_is_rebuilt(boundary: bytes, ctype: str) -> None:
    assert content_type_for(boundary) == ctype and boundary_of(ctype) == boundary


@pytest.mark.parametrize("ctype, code", [
    ("application/json", "unsupported_content_type"),
    ("multipart/form-data", "invalid_multipart"),
    ("multipart/form-data; boundary=", "invalid_multipart"),
    ("multipart/form-data; boundary=" + "x" * 71, "invalid_multipart"),
    ('multipart/form-data; note="; boundary=decoy;"', "invalid_multipart"),  # only inside a quoted value
    ("multipart/form-data; boundary=a; boundary=b", "invalid_multipart"),
    ("multipart/form-data; boundary=a b", "invalid_multipart"),
    ('multipart/form-data; boundary="ends in space "', "invalid_multipart"),
])
def test_bad_content_types(ctype: str, code: str) -> None:
    with pytest.raises(errors.GatewayError) as info:
        boundary_of(ctype)
    assert info.value.code == code


@pytest.mark.parametrize("head, expected", [
    (b'Content-Disposition: form-data; name="model"\r\n', ("model", False)),
    (b'content-disposition: FORM-DATA; filename="model"; NAME=file\r\nContent-Type: audio/wav\r\n', ("file", True)),
    (b'Content-Disposition: form-data; name="a\\"b"\r\n', ('a"b', False)),
    (b"Content-Disposition: form-data; name=f; filename*=UTF-8''na%C3%AFve.wav\r\n", ("f", True)),
    (b'Content-Disposition:form-data;name="x";filename="a;b.wav"\r\n', ("x", True)),
])
def test_disposition(head: bytes, expected: tuple[str, bool]) -> None:
    assert disposition(head) == expected


def test_bodies_larger_than_a_window_in_one_feed_or_many() -> None:
    """Heads, a 40 KiB captured value and boundary-like file bytes spread over several 16 KiB
    windows of one feed() come out the same as when fed in pieces."""
    import random

    rng = random.Random(5)
    file = bytes(rng.getrandbits(8) for _ in range(100_000)) + b"\r\n--" + B[:-1] + b"\r\r\n-"
    data = body(part("language", b"en" * 9000), part("model", b"m" * 40_000), part("file", file, "a.wav"),
                part("prompt", b"p" * 20_000), epilogue=b"\r\n" + b"e" * 30_000)
    expected = data.replace(b'name="model"\r\n\r\n' + b"m" * 40_000, b'name="model"\r\n\r\nwhisper-1')
    assert rewrite(data)[0] == expected
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 6)))
        out, fields = rewrite(data, cuts)
        assert out == expected and fields == [Field("model", b"m" * 40_000)]


def test_the_delimiter_search_is_bytes_find() -> None:
    """The rewriter's SIMD search (stringzilla) must answer as bytes.find does, on every kind of
    buffer it is given and for every start, including past the end."""
    import random

    from aisix.multipart import _find

    rng = random.Random(7)
    alphabet = b"\r\n-ab"  # few symbols: many near-misses and overlaps
    for _ in range(20000):
        hay = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 48)))
        needle = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
        start = rng.randint(0, len(hay) + 2)
        want = hay.find(needle, start)
        for buffer in (hay, bytearray(hay), memoryview(hay)):
            assert _find(buffer, needle, start) == want, (hay, needle, start)


@pytest.mark.parametrize("order", [("model", "file"), ("file", "model")])
def test_on_file_gets_exactly_the_file_parts_data_at_any_split(order: tuple[str, str]) -> None:
    """What the audio probe is fed: every byte of the file part, in order, nothing else, even
    where the file's bytes look like the start of a delimiter."""
    import random

    from tests.test_transcriptions import AUDIO, BOUNDARY, form

    body, _ = form(*order, fields=[("prompt", b"hi")])
    rng = random.Random(7)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(body)), rng.randint(1, 60)))
        got = bytearray()
        rw = Rewriter(BOUNDARY.encode())
        rw.on_file = got.extend
        for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True):
            rw.feed(body[a:b])
        rw.close()
        assert bytes(got) == AUDIO


# -- the usual prologue (model, text fields, the file's head), read whole from the first chunk ------

def _outcome(data: bytes, cuts: list[int], capture: frozenset[str] = frozenset({"model"}),
             max_head: int = 16 * 1024, max_value: int = 64 * 1024) -> tuple[object, ...]:
    """What a caller of the rewriter sees: the bytes with the model replaced, the fields, the
    file bytes on_file got and the state after; or the error, with its message (what went out
    before an error depends on the cuts, by design: never the whole body)."""
    rw = Rewriter(B, capture=capture, max_head=max_head, max_value=max_value)
    file = bytearray()
    rw.on_file = file.extend
    out, fields = bytearray(), []
    try:
        for a, b in itertools.pairwise([0, *cuts, len(data)]):
            pieces = rw.feed(data[a:b])
            for p in pieces:
                if isinstance(p, Field):
                    fields.append(p)
                    out += b"whisper-1" if p.name == "model" else p.value
                else:
                    out += p
        for p in rw.close():
            out += p
    except errors.GatewayError as exc:
        return ("error", exc.status, exc.code, exc.message)
    return (bytes(out), fields, bytes(file), rw.parts, sorted(rw.seen))


USUAL = body(part("model", b"whisper-prod"), part("file", AUDIO, "a.wav", "audio/wav"))
# The usual file part's head block as the cap counts it: from the boundary line's "--" to the blank line.
FILE_HEAD = len(part("file", b"", "a.wav", "audio/wav")) - 2
NEAR_USUAL = {
    "usual": USUAL,
    "no filename, no type": body(part("model", b"whisper-prod"), part("file", AUDIO)),
    "empty model value": body(part("model", b""), part("file", AUDIO, "a.wav")),
    "value starts with the boundary": body(part("model", b"--" + B + b"x"), part("file", AUDIO, "a.wav")),
    "value holds a near delimiter": body(part("model", b"a\r\n--" + B[:-1] + b"b"), part("file", AUDIO)),
    "padding after the delimiter": USUAL.replace(b"whisper-prod\r\n--" + B + b"\r\n",
                                                 b"whisper-prod\r\n--" + B + b" \t\r\n"),
    "junk after the delimiter": USUAL.replace(b"whisper-prod\r\n--" + B + b"\r\n",
                                              b"whisper-prod\r\n--" + B + b"x\r\n"),
    "two bytes of junk in place of the CRLF": USUAL.replace(b"whisper-prod\r\n--" + B + b"\r\n",
                                                           b"whisper-prod\r\n--" + B + b"xy"),
    "a typed model, a bare file": body(part("model", b"m", ctype="text/plain"), part("file", AUDIO)),
    # A CR then another byte where each CRLF is checked (found by a review: checking the CR alone
    # passed every body above).
    "CR then x after the first boundary": USUAL.replace(b"--" + B + b"\r\n", b"--" + B + b"\rx", 1),
    "CR then x after the delimiter": USUAL.replace(b"whisper-prod\r\n--" + B + b"\r\n",
                                                   b"whisper-prod\r\n--" + B + b"\rx"),
    "CR then x ending the model's head": USUAL.replace(b'name="model"\r\n\r\n', b'name="model"\r\n\rx', 1),
    "CR then x ending the file's head": USUAL.replace(b"audio/wav\r\n\r\n", b"audio/wav\r\n\rx", 1),
    "closing after the model": body(part("model", b"whisper-prod")),
    "file data starts with the boundary": body(part("model", b"whisper-prod"), part("file", b"--" + B + AUDIO)),
    "file data shorter than the boundary": body(part("model", b"whisper-prod"), part("file", b"ab")),
    "file data empty": body(part("model", b"whisper-prod"), part("file", b"")),
    "model second": body(part("file", AUDIO, "a.wav"), part("model", b"whisper-prod")),
    "no model, a field first": body(part("language", b"en"), part("file", AUDIO)),
    "a field between": body(part("model", b"m"), part("language", b"en"), part("file", AUDIO)),
    "the Python SDK's order": body(part("model", b"whisper-1"), part("language", b"en"),
                                   part("response_format", b"json"), part("file", AUDIO, "a.wav", "audio/wav")),
    "empty fields between": body(part("model", b"m"), part("prompt", b""), part("temperature", b""),
                                 part("file", AUDIO)),
    "a prompt between": body(part("model", b"m"), part("prompt", b"say hi"), part("file", AUDIO)),
    "a field named File": body(part("model", b"m"), part("File", b"x"), part("file", AUDIO)),
    "a field with a filename between": body(part("model", b"m"), part("notes", b"n", "n.txt"), part("file", AUDIO)),
    "14 fields between": body(part("model", b"m"), *(part(f"f{k}", b"v") for k in range(14)), part("file", AUDIO)),
    "15 fields between": body(part("model", b"m"), *(part(f"f{k}", b"v") for k in range(15)), part("file", AUDIO)),
    "a field value starting with the boundary": body(part("model", b"m"), part("language", b"--" + B),
                                                     part("file", AUDIO)),
    "a field value with a near delimiter": body(part("model", b"m"), part("language", b"e\r\n--" + B[:-1] + b"n"),
                                                part("file", AUDIO)),
    "a long field value": body(part("model", b"m"), part("prompt", b"p" * 70_000), part("file", AUDIO)),
    "CR then x after a field's delimiter": body(part("model", b"m"), part("language", b"en"), part("file", AUDIO))
    .replace(b"en\r\n--" + B + b"\r\n", b"en\r\n--" + B + b"\rx"),
    "junk after a field's delimiter": body(part("model", b"m"), part("language", b"en"), part("file", AUDIO))
    .replace(b"en\r\n--" + B + b"\r\n", b"en\r\n--" + B + b"  \r\n"),
    "closing after a field": body(part("model", b"m"), part("language", b"en")),
    "a model after a field": body(part("model", b"a"), part("language", b"en"), part("model", b"b"),
                                  part("file", AUDIO)),
    "two models": body(part("model", b"a"), part("model", b"b"), part("file", AUDIO)),
    "lower-case header": USUAL.replace(b"Content-Disposition", b"content-disposition", 1),
    "bare LF in the head": USUAL.replace(b'name="model"\r\n\r\n', b'name="model"\n\r\n', 1),
    "long filename": body(part("model", b"m"), part("file", AUDIO, "f" * 20_000)),
    "long model value": body(part("model", b"m" * 70_000), part("file", AUDIO)),
    "no closing delimiter": USUAL[:-len(b"--" + B + b"--\r\n")],
}


@pytest.mark.parametrize("name", NEAR_USUAL)
def test_the_usual_prologue_reads_as_the_state_machine_reads_it(name: str) -> None:
    """Whole in the first chunk (the quick read) and with the first byte alone (the state machine
    only: the quick read needs the whole prologue), every body near the usual shape gives the same
    bytes, fields, file bytes and state, or the same error; so do other cuts through it."""
    data = NEAR_USUAL[name]
    expected = _outcome(data, [1])
    assert _outcome(data, []) == expected
    for cut in range(2, min(len(data), 400), 7):
        assert _outcome(data, [cut]) == expected, f"cut at {cut}"
    for capture in (frozenset({"model", "prompt"}), frozenset({"model", "file"}), frozenset({"prompt"})):
        assert _outcome(data, [], capture) == _outcome(data, [1], capture), capture
    # Head and value caps near what these bodies hold: 90 is under a typed model part's head and
    # over a bare file part's; the usual file part's head is FILE_HEAD bytes, a cap at it passes.
    for caps in ((90, 64 * 1024), (FILE_HEAD - 1, 64 * 1024), (FILE_HEAD, 64 * 1024), (200, 64 * 1024),
                 (16 * 1024, 4)):
        assert _outcome(data, [], max_head=caps[0], max_value=caps[1]) == \
            _outcome(data, [1], max_head=caps[0], max_value=caps[1]), caps


def test_the_usual_prologue_is_read_quickly() -> None:
    """The quick read is taken for what curl and the SDKs send (else the test above compares the
    state machine with itself): after the first chunk the model and the file's head are behind it,
    and the file's bytes in that chunk are handed on uncopied."""
    rw = Rewriter(B)
    data = USUAL
    pieces = rw.feed(data)
    assert rw.parts == 2 and rw.seen == {"model", "file"} and not rw._buf
    assert pieces[1] == Field("model", b"whisper-prod")
    assert isinstance(pieces[3], memoryview)  # the file's bytes: a view of the chunk, not a copy
    rw = Rewriter(B)
    pieces = rw.feed(NEAR_USUAL["the Python SDK's order"])  # model, language, response_format, file
    assert rw.parts == 4 and rw.seen == {"model", "file"} and not rw._buf
    assert pieces[1] == Field("model", b"whisper-1") and isinstance(pieces[3], memoryview)
    for fields, quick in ((14, True), (15, False)):  # more fields than the quick read takes
        pieces = Rewriter(B).feed(NEAR_USUAL[f"{fields} fields between"])
        # The quick read hands the fields and the file's head on as one slice of the chunk (bytes);
        # the state machine, from its buffer (bytearrays).
        read_quickly = any(type(p) is bytes and p.endswith(b'name="file"\r\n\r\n') for p in pieces)
        assert read_quickly == quick, fields
