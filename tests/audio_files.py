"""Real audio files for the probe tests, made with ffmpeg at known durations, and ffprobe's reading
of them (the ground truth the probes are held to: within 1% or 50 ms).

Files are cached per test session under one temp directory: each (format, seconds) is made once,
and the directory is removed when the process ends.
"""

from __future__ import annotations

import atexit
import json
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from aisix.audio import Probe

_CACHE = Path(tempfile.mkdtemp(prefix="aisix-audio-"))
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)  # each run made one; none was removed

# name -> (file suffix, ffmpeg output arguments)
FORMATS: dict[str, tuple[str, list[str]]] = {
    "wav": (".wav", ["-c:a", "pcm_s16le"]),
    "wav-24k-mono": (".wav", ["-ar", "24000", "-ac", "1", "-c:a", "pcm_s16le"]),
    "mp3-cbr": (".mp3", ["-c:a", "libmp3lame", "-b:a", "128k", "-write_xing", "0"]),
    "mp3-xing": (".mp3", ["-c:a", "libmp3lame", "-q:a", "4"]),  # VBR, with a Xing header
    "mp3-cbr-info": (".mp3", ["-c:a", "libmp3lame", "-b:a", "64k"]),  # CBR with an Info header
    "mp3-id3": (".mp3", ["-c:a", "libmp3lame", "-b:a", "96k", "-id3v2_version", "3",
                         "-metadata", "title=" + "x" * 2000]),
    "aac-adts": (".aac", ["-c:a", "aac", "-b:a", "96k", "-f", "adts"]),
    "flac": (".flac", ["-c:a", "flac"]),
    "ogg-opus": (".ogg", ["-c:a", "libopus", "-b:a", "48k"]),
    "ogg-vorbis": (".ogg", ["-c:a", "libvorbis", "-q:a", "3"]),
    "webm-opus": (".webm", ["-c:a", "libopus", "-b:a", "48k"]),
    "mka-vorbis": (".mka", ["-c:a", "libvorbis"]),
    "m4a-moov-last": (".m4a", ["-c:a", "aac", "-b:a", "96k"]),
    "m4a-moov-first": (".m4a", ["-c:a", "aac", "-b:a", "96k", "-movflags", "+faststart"]),
    "mp4-audio": (".mp4", ["-c:a", "aac", "-b:a", "64k", "-movflags", "+faststart"]),
    # Fragments, as MediaRecorder in Safari and live muxers write them: an empty moov, then
    # moof/mdat pairs (about one a second); no mehd.
    "m4a-fragmented": (".m4a", ["-c:a", "aac", "-b:a", "96k", "-movflags", "frag_keyframe+empty_moov+default_base_moof",
                                "-frag_duration", "1000000"]),
}


def make(fmt: str, seconds: float, rate: int = 44100, channels: int = 2) -> Path:
    """A file of `seconds` of a sine tone in format `fmt` (FORMATS), made once per session."""
    suffix, args = FORMATS[fmt]
    out = _CACHE / f"{fmt}-{seconds}-{rate}-{channels}{suffix}"
    if not out.exists():
        source = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={rate}:duration={seconds}"]
        layout = ["-ac", str(channels)] if "-ac" not in args else []
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *source, *layout, *args, str(out)],
                       check=True, timeout=120)
    return out


def ffprobe_seconds(path: Path) -> float:
    """The duration ffprobe reports for the file (format level)."""
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "json", str(path)],
                         check=True, capture_output=True, text=True, timeout=60)
    return float(json.loads(out.stdout)["format"]["duration"])


def close_enough(measured: float | None, truth: float) -> bool:
    """Within 1% or 50 ms of the truth, whichever is looser."""
    return measured is not None and abs(measured - truth) <= max(0.05, truth * 0.01)


def splits(data: bytes, seed: int = 0, count: int = 20) -> Iterator[list[bytes]]:
    """The file cut in ways a stream may cut it: whole, at random points, in 1- to 7-byte pieces."""
    yield [data]
    rng = random.Random(seed)
    for _ in range(count):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 40))))
        yield [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    pieces, at = [], 0
    while at < len(data):
        n = rng.randint(1, 7)
        pieces.append(data[at:at + n])
        at += n
    yield pieces


def every_split_point(data: bytes, limit: int = 4096) -> Iterator[list[bytes]]:
    """[head, tail] for every cut in the first `limit` bytes (where the headers are)."""
    for cut in range(1, min(limit, len(data))):
        yield [data[:cut], data[cut:]]


def run(factory: Callable[[], Probe], pieces: list[bytes]) -> tuple[Probe, float | None]:
    probe = factory()
    for piece in pieces:
        probe.feed(memoryview(piece))
    return probe, probe.end()
