"""Coverage-guided fuzzing of the WAV and MP3/ADTS duration probes (aisix/audio_riff.py,
aisix/audio_mpeg.py) with atheris.

Run it (atheris is installed into .venv by ``make soak-fuzz``; see fuzz/README.md):

    .venv/bin/python fuzz/fuzz_audio_riff_mpeg.py fuzz/corpus-audio-riff-mpeg -max_total_time=120 \\
      -max_len=65536 -timeout=10 -rss_limit_mb=2048

One fuzz input is ``[chunking byte][seed byte][file...]``; the file is fed to both probes, whole
and cut into chunks (bits 0-2 of the first byte: one byte at a time, or random sizes up to 4, 16,
64, 256, 1024, 4096 or 65536 bytes, drawn from the seed byte). ``check()`` asserts, for each probe:

1. nothing raises, from ``feed``, ``end`` or the properties;
2. after every feed, the state it keeps (``state_size()``) is at most aisix.audio.STATE_LIMIT;
3. ``at_least`` is a finite number >= 0 that never decreases; ``declared`` is None or a finite
   number >= 0 and never changes once set;
4. the whole file and the chunks give the same ``end()`` and ``declared``;
5. ``end()`` is None or a finite number >= ``at_least``.

Time is bounded by libFuzzer's ``-timeout`` (one input over 10 s is a crash), memory by
``-rss_limit_mb``. ``--write-seeds DIR`` writes the seed corpus (small ffmpeg-made files and a few
hostile shapes); tests/test_audio_mpeg.py replays every file of fuzz/corpus-audio-riff-mpeg.
"""

from __future__ import annotations

import math
import pathlib
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable

_ROOT = str(pathlib.Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from aisix.audio import STATE_LIMIT  # noqa: E402
from aisix.audio_mpeg import Mpeg  # noqa: E402
from aisix.audio_riff import Wav  # noqa: E402

PROBES: tuple[Callable[[], Wav | Mpeg], ...] = (Wav, Mpeg)
LIMITS = (1, 4, 16, 64, 256, 1024, 4096, 65536)


def cuts_of(mode: int, seed: int, size: int) -> list[int]:
    """Chunk boundaries for a body of `size` bytes."""
    if size == 0:
        return []
    limit = LIMITS[mode & 7]
    if limit == 1:
        return list(range(1, size))
    rng = random.Random(seed)
    cuts: list[int] = []
    at = 0
    while True:
        at += rng.randint(1, limit)
        if at >= size:
            return cuts
        cuts.append(at)


def _number(value: float | None, name: str) -> None:
    assert value is None or (math.isfinite(value) and value >= 0), f"{name} = {value!r}"


def run(factory: Callable[[], Wav | Mpeg], pieces: list[bytes]) -> tuple[float | None, float | None]:
    probe = factory()
    last, declared = 0.0, None
    for piece in pieces:
        probe.feed(memoryview(piece))
        assert probe.state_size() <= STATE_LIMIT, f"{factory.__name__} keeps {probe.state_size()} bytes"
        now = probe.at_least
        _number(now, "at_least")
        assert now >= last, f"at_least went down: {last} -> {now}"
        last = now
        _number(probe.declared, "declared")
        assert declared is None or probe.declared == declared, f"declared changed: {declared} -> {probe.declared}"
        declared = probe.declared
    seconds = probe.end()
    _number(seconds, "end()")
    assert seconds is None or seconds >= probe.at_least, f"end() {seconds} < at_least {probe.at_least}"
    return seconds, probe.declared


def check(body: bytes, cuts: list[int]) -> None:
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    for factory in PROBES:
        whole = run(factory, [body])
        chunked = run(factory, pieces)
        assert whole == chunked, f"{factory.__name__}: whole {whole} != chunked {chunked}"


def test_one_input(data: bytes) -> None:
    data = data.ljust(2, b"\0")
    body = data[2:]
    check(body, cuts_of(data[0], data[1], len(body)))


def write_seeds(directory: pathlib.Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    outputs = {
        "wav": ["-ar", "8000", "-c:a", "pcm_s16le"],
        "wav-streamed": ["-ar", "8000", "-c:a", "pcm_u8", "-f", "wav"],
        "rf64": ["-ar", "8000", "-c:a", "pcm_s16le", "-rf64", "always"],
        "wav-extensible": ["-ar", "8000", "-ac", "3", "-c:a", "pcm_s24le"],
        "mp3-cbr": ["-c:a", "libmp3lame", "-b:a", "32k", "-write_xing", "0"],
        "mp3-xing": ["-c:a", "libmp3lame", "-q:a", "9"],
        "mp3-mpeg25": ["-ar", "8000", "-c:a", "libmp3lame", "-b:a", "8k"],
        "mp2": ["-ar", "32000", "-c:a", "mp2", "-b:a", "64k", "-f", "mp2"],
        "aac-adts": ["-c:a", "aac", "-b:a", "32k", "-f", "adts"],
    }
    with tempfile.TemporaryDirectory() as scratch:
        for name, args in outputs.items():
            out = pathlib.Path(scratch) / (name + (".wav" if "wav" in name or "rf64" in name else ".mp3"))
            target = "pipe:1" if name == "wav-streamed" else str(out)
            seconds = 0.15 if name.startswith(("mp", "aac")) else 0.02  # a few frames; samples are dull
            made = subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                                   f"sine=frequency=440:sample_rate=16000:duration={seconds}", *args, target],
                                  check=True, capture_output=True, timeout=60)
            body = made.stdout if name == "wav-streamed" else out.read_bytes()
            for mode in (0, 3):
                (directory / f"seed-{name}-{mode}").write_bytes(bytes([mode, 7]) + body)
    hostile = {
        "id3-huge": b"ID3\x04\x00\x10\x7f\x7f\x7f\x7f" + b"\xff\xfb\x90\x64" * 8,
        "adts-7-byte-frames": b"\xff\xf1\x50\x80\x00\xff\xfc" * 40,
        "sync-run": b"\xff" * 300,
        "apetag": b"\xff\xfb\x10\x64" + bytes(100) + b"APETAGEX" + bytes(4) + b"\xff\xff\xff\xff" + bytes(16),
        "riff-fmt-huge": b"RIFF\x00\x00\x00\x00WAVEfmt \xf0\xff\xff\xff" + bytes(16),
    }
    for name, body in hostile.items():
        (directory / f"seed-x-{name}").write_bytes(bytes([2, 1]) + body)


def main() -> None:
    if sys.argv[1:2] == ["--write-seeds"]:
        write_seeds(pathlib.Path(sys.argv[2]))
        return
    import atheris  # type: ignore[import-untyped]

    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
