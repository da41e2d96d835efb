"""Coverage-guided fuzzing of the FLAC and OGG duration probes (aisix/audio_flac.py,
aisix/audio_ogg.py) with atheris.

    .venv/bin/python fuzz/fuzz_audio_flacogg.py /tmp/aisix-fuzz-audio fuzz/corpus-flacogg \\
        -max_total_time=120 -timeout=10 -rss_limit_mb=2048

(atheris as ``make soak-fuzz`` installs it). One input is ``[config byte][seed byte][file...]``:
config bit 0 picks the probe (FLAC, OGG), bits 1-3 how the file is cut into chunks
(``cuts_of``: one chunk, a byte at a time, random pieces of up to 4**k bytes), the seed byte
drives the piece sizes.

For every input, ``check()`` asserts:

1. nothing raises: ``feed``, ``end``, ``declared``, ``at_least``;
2. the state stays bounded after every feed: ``held()`` within the probe's own bound (FLAC 34
   bytes, OGG 282) and so within aisix.audio.STATE_LIMIT, and OGG follows at most 16 streams;
3. ``at_least`` is finite, never negative and never decreases; ``declared``, once set, never
   changes;
4. ``end()`` is None or a finite duration no shorter than ``at_least``;
5. the file fed whole and fed in the chosen pieces gives the same ``declared``, ``at_least`` and
   ``end()``.

Hangs are caught by ``-timeout`` (one input taking over 10 s), memory by ``-rss_limit_mb``.
tests/test_audio_flac.py and tests/test_audio_ogg.py load this file to replay the seed corpus and
to run the same checks on mutated real files.
"""

from __future__ import annotations

import itertools
import math
import pathlib
import random
import sys
from collections.abc import Callable

# Run as a script from anywhere: the repository root holds the aisix package.
_ROOT = str(pathlib.Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from aisix.audio import STATE_LIMIT  # noqa: E402
from aisix.audio_flac import Flac  # noqa: E402
from aisix.audio_ogg import Ogg  # noqa: E402

# probe class -> the most held() may report between feeds
BOUNDS: dict[type, int] = {Flac: 34, Ogg: 27 + 255}
PROBES: tuple[type, ...] = (Flac, Ogg)
MAX_STREAMS = 16
assert all(bound <= STATE_LIMIT for bound in BOUNDS.values())


def cuts_of(mode: int, seed: int, size: int) -> list[int]:
    """Chunk boundaries: 0 one chunk, 1 a byte at a time, 2-7 random pieces of 1..4**(mode-1)."""
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


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed_checked(factory: Callable[[], Flac | Ogg], pieces: list[bytes]) -> tuple[float | None, float, float | None]:
    """Feed the pieces, checking invariants 1-4 after each; (declared, at_least, end())."""
    probe = factory()
    bound = BOUNDS[type(probe)]
    seen, declared = 0.0, None
    for piece in pieces:
        probe.feed(memoryview(piece))
        held = probe.held()
        assert held <= bound, f"{type(probe).__name__} holds {held} bytes > {bound}"
        if isinstance(probe, Ogg):
            assert len(probe._streams) <= MAX_STREAMS
        now = probe.at_least
        assert math.isfinite(now) and now >= seen, f"at_least went from {seen} to {now}"
        seen = now
        if declared is not None:
            assert probe.declared == declared, f"declared changed from {declared} to {probe.declared}"
        declared = probe.declared
    result = probe.end()
    assert result is None or (math.isfinite(result) and result >= probe.at_least), (result, probe.at_least)
    return probe.declared, probe.at_least, result


def check(factory: Callable[[], Flac | Ogg], data: bytes, cuts: list[int]) -> float | None:
    whole = feed_checked(factory, [data])
    pieces = feed_checked(factory, split(data, cuts))
    assert whole == pieces, f"whole {whole} vs in pieces {pieces}"
    return whole[2]


def decode(data: bytes) -> tuple[type, list[int], bytes]:
    if len(data) < 2:
        data = data.ljust(2, b"\0")
    config, seed, body = data[0], data[1], data[2:]
    return PROBES[config & 1], cuts_of(config >> 1 & 7, seed, len(body)), body


def encode(body: bytes, probe: type, mode: int = 0, seed: int = 0) -> bytes:
    return bytes([PROBES.index(probe) | mode << 1, seed]) + body


def test_one_input(data: bytes) -> None:
    factory, cuts, body = decode(data)
    check(factory, body, cuts)


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
