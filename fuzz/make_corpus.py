"""Write the seed corpus, fuzz/corpus/, from readable definitions (rerun after editing).

    .venv/bin/python fuzz/make_corpus.py

Each file is one fuzz input as fuzz_multipart.decode() reads it: a config byte (boundary, caps,
chunking), a seed byte, then the body.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from fuzz_multipart import BOUNDARIES, encode  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent / "corpus"


def part(b: bytes, name: str, value: bytes, filename: str | None = None, ctype: str | None = None,
         pad: bytes = b"") -> bytes:
    disp = f'Content-Disposition: form-data; name="{name}"'
    if filename is not None:
        disp += f'; filename="{filename}"'
    head = disp + "\r\n" + (f"Content-Type: {ctype}\r\n" if ctype else "")
    return b"--" + b + pad + b"\r\n" + head.encode() + b"\r\n" + value + b"\r\n"


def close(b: bytes, epilogue: bytes = b"\r\n") -> bytes:
    return b"--" + b + b"--" + epilogue


def seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for idx, b in enumerate(BOUNDARIES):
        wav = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(0, 256, 7))
        out[f"model-first-b{idx}"] = encode(
            part(b, "model", b"whisper-1") + part(b, "file", wav, "a.wav", "audio/wav")
            + part(b, "response_format", b"json") + close(b),
            boundary_index=idx, mode=idx % 4 + 1, seed=idx)
        out[f"file-first-b{idx}"] = encode(
            part(b, "file", wav, "a.wav", "audio/wav") + part(b, "model", b"whisper-1")
            + part(b, "timestamp_granularities[]", b"word")
            + part(b, "timestamp_granularities[]", b"segment") + close(b),
            boundary_index=idx, mode=0 if idx % 2 else 3, seed=7 * idx)
    b = BOUNDARIES[0]
    # Boundary look-alikes that are data: no CRLF--boundary anywhere, no --boundary at the start.
    tricky = (b"x--" + b + b"\r\n\n--" + b + b"X\r\n-" + b + b"\r\n--\r\r\n\r\nx--" + b + b"--")
    out["boundary-like-file"] = encode(
        part(b, "file", tricky, "x.bin") + part(b, "model", b"m") + close(b), 0, mode=1)
    out["padding-epilogue"] = encode(
        part(b, "model", b"whisper-1", pad=b" \t")
        + part(b, "file", b"abc", 'we\\"ird; name=model.wav') + close(b, b"\r\nepilogue"), 0, mode=2, seed=3)
    out["empty-values"] = encode(part(b, "model", b"") + part(b, "file", b"") + close(b), 0, mode=1)
    out["missing-file"] = encode(part(b, "model", b"m") + part(b, "language", b"en") + close(b), 0, mode=2)
    out["missing-model"] = encode(part(b, "file", b"f", "a") + close(b), 0, mode=2)
    out["two-models"] = encode(part(b, "model", b"a") + part(b, "model", b"b") + part(b, "file", b"f") + close(b), 0)
    out["truncated"] = encode((part(b, "model", b"whisper-1") + part(b, "file", b"abc"))[:-3], 0, mode=2)
    out["bad-boundary-line"] = encode(b"--" + b + b" x\r\n\r\n" + part(b, "model", b"m") + close(b), 0)
    # Layouts other parsers read differently, all refused (see the module docstring).
    model, file, end = part(b, "model", b"m"), part(b, "file", b"f", "a"), close(b)
    cd = b'Content-Disposition: form-data; name="model"'
    out["x-preamble"] = encode(b"preamble\r\n" + model + file + end, 0, mode=2)
    out["x-delimiter-then-junk"] = encode(file[:-2] + b"\r\n--" + b + b"X\r\n" + model + end, 0, mode=2)
    out["x-no-headers"] = encode(b"--" + b + b"\r\n\r\nanon\r\n" + model + file + end, 0, mode=2)
    out["x-header-bare-lf"] = encode(b"--" + b + b"\r\n" + cd + b"\r\n\nhidden\r\n" + model + file + end, 0)
    out["x-header-cr-line"] = encode(b"--" + b + b"\r\n" + cd + b"\r\n\r\r\nhidden\r\n" + model + file + end, 0)
    out["x-obs-fold"] = encode(b"--" + b + b'\r\nContent-Disposition: form-data;\r\n name="model"\r\n\r\nh\r\n'
                               + model + file + end, 0)
    out["x-name-star"] = encode(b"--" + b + b"\r\nContent-Disposition: form-data; name*=UTF-8''model\r\n\r\nh\r\n"
                                + model + file + end, 0)
    out["x-attachment"] = encode(b"--" + b + b'\r\nContent-Disposition: attachment; name="model"\r\n\r\nh\r\n'
                                 + model + file + end, 0)
    out["x-data-starts-with-boundary"] = encode(file[:-3] + b"--" + b + b"\r\n" + model + end, 0, mode=1)
    # Small caps (CAPS[2]: header block 128, value 32; CAPS[1]: header block 48).
    out["small-caps-ok"] = encode(part(b, "model", b"m" * 32) + part(b, "file", b"f") + close(b), 0, caps=2, mode=2)
    out["small-caps-value-over"] = encode(part(b, "model", b"m" * 33) + part(b, "file", b"f") + close(b), 0, caps=2)
    out["small-caps-head-over"] = encode(
        part(b, "model", b"m") + part(b, "file", b"f", "a-long-file-name.wav") + close(b), 0, caps=1, mode=3)
    return out


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for old in HERE.glob("seed-*"):
        old.unlink()
    for name, data in seeds().items():
        (HERE / f"seed-{name}").write_bytes(data)
    total = sum(p.stat().st_size for p in HERE.iterdir())
    print(f"{len(list(HERE.iterdir()))} files, {total} bytes in {HERE}")


if __name__ == "__main__":
    main()
