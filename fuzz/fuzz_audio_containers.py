"""Coverage-guided fuzzing of the WebM/Matroska and MP4 duration probes (aisix/audio_mkv.py,
aisix/audio_mp4.py) with atheris.

Run it (atheris is installed by ``make soak-fuzz``; see fuzz/README.md):

    .venv/bin/python fuzz/fuzz_audio_containers.py /tmp/aisix-fuzz/containers -max_total_time=120

The first corpus directory given is seeded, when it holds no file yet, with small real files
made by ffmpeg (WebM/Opus with and without Duration, unknown-size Clusters, Matroska/Vorbis, M4A
with ``moov`` first and last, fragmented MP4), each prefixed with the two control bytes below.

One fuzz input is ``[control byte][chunking seed byte][file bytes...]``:

- control bit 0: the probe, ``MatroskaProbe`` (0) or ``Mp4Probe`` (1);
- control bits 1-3: how the file is cut (``cuts_of``): one chunk, one byte at a time, or random
  chunks of up to 2, 8, 32 ... 4096 bytes drawn from the seed byte.

For every input, ``check()`` asserts:

1. nothing is raised, by ``feed()``, the properties or ``end()``;
2. after every ``feed()`` the probe's held partial item stays under the module's ``_ITEM``,
   and its whole state (``state_size()``: its fields, containers included; measured after the
   first 16 feeds, every 64th and the last) under ``aisix.audio.STATE_LIMIT``;
3. ``at_least`` never decreases and is never negative; ``declared``, once set, never changes;
4. ``end()`` is None or a finite number >= 0, at least ``declared`` when that is set (MKV) or
   equal to it (MP4), and at least the last ``at_least``;
5. the same file fed in one chunk gives the same ``declared``, ``at_least`` and ``end()``;
6. a probe that gave up ignores what follows: fed 64 KiB more, its state does not grow.

Hangs are caught by libFuzzer's ``-timeout`` and memory by ``-rss_limit_mb``.
tests/test_audio_mkv.py and tests/test_audio_mp4.py load this file to run ``check()`` on mutated
real files on every ``pytest`` run.
"""

from __future__ import annotations

import math
import pathlib
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

# Run as a script from anywhere: the repository root holds the aisix package.
_ROOT = str(pathlib.Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from aisix import audio_mkv, audio_mp4  # noqa: E402
from aisix.audio import STATE_LIMIT  # noqa: E402

PROBES: tuple[tuple[Callable[[], object], int], ...] = (
    (audio_mkv.MatroskaProbe, audio_mkv._ITEM),
    (audio_mp4.Mp4Probe, audio_mp4._ITEM),
)


def state_size(probe: object) -> int:
    """Bytes held by the probe: every slot's value, the containers' items counted too."""
    seen: set[int] = set()

    def size(value: object) -> int:
        if id(value) in seen:
            return 0
        seen.add(id(value))
        total = sys.getsizeof(value)
        if isinstance(value, dict):
            total += sum(size(k) + size(v) for k, v in value.items())
        elif isinstance(value, list | tuple | set):
            total += sum(size(v) for v in value)
        return total

    return sum(size(getattr(probe, name)) for name in type(probe).__slots__ if hasattr(probe, name))


def cuts_of(length: int, control: int, seed: int) -> list[int]:
    """Cut points in a file of ``length`` bytes (control bits 1-3, see the module docstring)."""
    mode = (control >> 1) & 7
    if mode == 0 or length < 2:
        return []
    if mode == 1:
        return list(range(1, length))
    rng = random.Random(seed)
    most = 2 ** (2 * mode - 1)   # 8, 32, ... 8192 bytes: modes 2..7
    cuts, at = [], 0
    while True:
        at += rng.randint(1, most)
        if at >= length:
            return cuts
        cuts.append(at)


def pieces_of(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
        yield data[a:b]


def outcome(factory: Callable[[], object], pieces: Iterator[bytes], item: int) -> tuple[object, ...]:
    """Feed the pieces with checks 1-4 after every feed; (declared, at_least, end, probe)."""
    probe = factory()
    last_at_least, declared = 0.0, None
    for count, piece in enumerate(pieces):
        probe.feed(memoryview(piece))  # type: ignore[attr-defined]
        assert len(probe._buf) < item, ("held item", len(probe._buf))  # type: ignore[attr-defined]
        if count < 16 or not count % 64:  # the deep walk is slow; the fields only grow by feeds
            held = state_size(probe)
            assert held <= STATE_LIMIT, ("state", held)
        at_least = probe.at_least  # type: ignore[attr-defined]
        assert at_least >= last_at_least >= 0, ("at_least went back", last_at_least, at_least)
        last_at_least = at_least
        now = probe.declared  # type: ignore[attr-defined]
        assert declared is None or now in (declared, None), ("declared changed", declared, now)
        declared = now if now is not None else declared
    held = state_size(probe)
    assert held <= STATE_LIMIT, ("state", held)
    result = probe.end()  # type: ignore[attr-defined]
    if result is not None:
        assert math.isfinite(result) and result >= 0, result
        assert result >= last_at_least, (result, last_at_least)
        final = probe.declared  # type: ignore[attr-defined]
        if final is not None:
            assert result >= final if factory is audio_mkv.MatroskaProbe else result == final
    return probe.declared, probe.at_least, result, probe  # type: ignore[attr-defined]


def check(data: bytes) -> None:
    if len(data) < 2:
        return
    control, seed, body = data[0], data[1], data[2:]
    factory, item = PROBES[control & 1]
    *whole, _ = outcome(factory, iter([body]), item)
    *chunked, probe = outcome(factory, pieces_of(body, cuts_of(len(body), control, seed)), item)
    assert whole == chunked, ("one chunk vs chunked", whole, chunked)
    if probe._dead:  # type: ignore[attr-defined]
        before = state_size(probe)
        probe.feed(bytes(65536))  # type: ignore[attr-defined]
        assert state_size(probe) <= before, "a probe that gave up kept reading"


# -- seeds -----------------------------------------------------------------------------------------

SEEDS = {  # name -> (control byte, ffmpeg output arguments, output to a pipe)
    "webm-opus": (0, ["-c:a", "libopus", "-b:a", "24k", "-f", "webm"], False),
    "webm-opus-live": (0, ["-c:a", "libopus", "-b:a", "24k", "-f", "webm"], True),
    "mka-vorbis-live": (0, ["-c:a", "libvorbis", "-f", "matroska"], True),
    "mka-vorbis": (0, ["-c:a", "libvorbis", "-f", "matroska"], False),
    "m4a-moov-last": (1, ["-c:a", "aac", "-b:a", "32k", "-f", "ipod"], False),
    "m4a-moov-first": (1, ["-c:a", "aac", "-b:a", "32k", "-movflags", "+faststart", "-f", "ipod"], False),
    "mp4-fragmented": (1, ["-c:a", "aac", "-b:a", "32k", "-movflags", "frag_keyframe+empty_moov", "-f", "mp4"],
                       True),
}


def seed_file(args: list[str], to_pipe: bool, seconds: float = 0.3) -> bytes:
    """A short tone made by ffmpeg: written to a pipe (not seekable: no Duration, no Cues, sizes
    unknown) or to a file (seekable: the muxer goes back to fill them in)."""
    source = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=24000:duration={seconds}"]
    command = ["ffmpeg", "-hide_banner", "-loglevel", "error", *source, "-ac", "1", *args]
    if to_pipe:
        return subprocess.run([*command, "pipe:1"], check=True, capture_output=True, timeout=60).stdout
    with tempfile.TemporaryDirectory() as directory:
        out = pathlib.Path(directory) / "seed"
        subprocess.run([*command, "-y", str(out)], check=True, timeout=60)
        return out.read_bytes()


def write_seeds(corpus: pathlib.Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for name, (control, args, to_pipe) in SEEDS.items():
        (corpus / f"seed-{name}").write_bytes(bytes([control | 0x0C, 7]) + seed_file(args, to_pipe))


def main() -> None:
    import atheris

    corpus = next((pathlib.Path(arg) for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if corpus is not None and (not corpus.exists() or not any(corpus.iterdir())):
        write_seeds(corpus)
    # Instrument what is already loaded: the probes and the checks above.
    atheris.instrument_all()
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
