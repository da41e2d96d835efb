"""`make bench-probes`: the audio duration probes alone, MiB/s per format.

Every upload's file bytes and every speech answer go through a probe (aisix/audio_detect.py picks
it from the first bytes), on the gateway's one thread, so a probe's speed is a share of the
request's. This feeds each probe a real file made by ffmpeg (20 s of a tone, or 120 s where the
file would be small), in 64 KiB chunks as the rewriter hands them on, and prints the best of 5
runs, with the duration read and ffprobe's for the same file.

    .venv/bin/python bench/probes.py [--seconds 20] [--chunk-kib 64] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from aisix.audio_detect import Detect

# name -> (suffix, ffmpeg output arguments, sample rate, channels, what it shows)
FORMATS: dict[str, tuple[str, list[str], int, int, str]] = {
    "WAV 44.1 kHz stereo": (".wav", ["-c:a", "pcm_s16le"], 44100, 2, "data bytes only counted"),
    "MP3 CBR 128k, 44.1 kHz": (".mp3", ["-c:a", "libmp3lame", "-b:a", "128k"], 44100, 2,
                               "padded frames (417/418 bytes): one frame at a time"),
    "MP3 CBR 128k, 48 kHz": (".mp3", ["-c:a", "libmp3lame", "-b:a", "128k"], 48000, 2,
                             "equal frames: runs checked by slicing"),
    "MP3 CBR 32k, 16 kHz mono": (".mp3", ["-c:a", "libmp3lame", "-b:a", "32k"], 16000, 1,
                                 "a voice recording: equal 144-byte frames"),
    "MP3 VBR (Xing)": (".mp3", ["-c:a", "libmp3lame", "-q:a", "4"], 44100, 2, "frame lengths vary"),
    "AAC in ADTS 96k": (".aac", ["-c:a", "aac", "-b:a", "96k", "-f", "adts"], 44100, 2,
                        "one header per 1,024 samples"),
    "FLAC": (".flac", ["-c:a", "flac"], 44100, 2, "each frame header's CRC-8 checked"),
    "OGG Opus 48k": (".ogg", ["-c:a", "libopus", "-b:a", "48k"], 48000, 2, "page headers only"),
    "OGG Vorbis": (".ogg", ["-c:a", "libvorbis", "-q:a", "3"], 44100, 2, "page headers only"),
    "WebM Opus 48k": (".webm", ["-c:a", "libopus", "-b:a", "48k"], 48000, 2, "one block per 20 ms"),
    "M4A AAC 96k, moov last": (".m4a", ["-c:a", "aac", "-b:a", "96k"], 44100, 2, "mdat skipped by its size"),
    "M4A AAC 96k, fragmented": (".m4a", ["-c:a", "aac", "-b:a", "96k", "-movflags",
                                         "frag_keyframe+empty_moov+default_base_moof", "-frag_duration", "1000000"],
                                44100, 2, "a moof per second: its trun read, mdat skipped"),
}


def make(dir: Path, name: str, seconds: float) -> Path:
    suffix, args, rate, channels, _ = FORMATS[name]
    out = dir / (name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "") + suffix)
    source = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={rate}:duration={seconds}"]
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *source, "-ac", str(channels), *args,
                    str(out)], check=True, timeout=300)
    return out


def ffprobe_seconds(path: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "json", str(path)],
                         check=True, capture_output=True, text=True, timeout=60)
    return float(json.loads(out.stdout)["format"]["duration"])


def measure(data: bytes, chunk: int, repeat: int) -> tuple[float, float | None]:
    """(best seconds for the whole file, the duration the probe read)."""
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    best, seconds = float("inf"), None
    for _ in range(repeat):
        probe = Detect()
        t0 = time.perf_counter()
        for piece in pieces:
            probe.feed(piece)
        seconds = probe.end()
        best = min(best, time.perf_counter() - t0)
    return best, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--chunk-kib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("ffmpeg") is None:
        print("bench/probes.py needs ffmpeg (make test installs it)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="aisix-probes-") as tmp:
        print(f"audio probes alone: {args.seconds:g} s files (120 s for those under 1 MiB), fed in "
              f"{args.chunk_kib} KiB chunks, best of {args.repeat}")
        print(f"  {'format':<28}{'file':>10}{'MiB/s':>9}{'us/256 KiB':>12}{'read s':>9}{'ffprobe s':>10}  note")
        for name in FORMATS:
            path = make(Path(tmp), name, args.seconds)
            if path.stat().st_size < 1 << 20:
                path = make(Path(tmp), name, 120.0)
            data = path.read_bytes()
            took, read = measure(data, args.chunk_kib * 1024, args.repeat)
            mib = len(data) / (1 << 20)
            per = took / len(data) * 256 * 1024 * 1e6
            shown = "none" if read is None else f"{read:.2f}"
            print(f"  {name:<28}{mib:>6.1f} MiB{mib / took:>9,.0f}{per:>12,.1f}{shown:>9}"
                  f"{ffprobe_seconds(path):>10.2f}  {FORMATS[name][4]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
