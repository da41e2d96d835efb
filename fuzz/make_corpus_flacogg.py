"""Write the seed corpus of the FLAC/OGG probe fuzzer, fuzz/corpus-flacogg/ (rerun after editing).

    .venv/bin/python fuzz/make_corpus_flacogg.py

Short real files made by ffmpeg (FLAC with and without a total in STREAMINFO, at rates whose
frame headers carry the rate or block size at their end; OGG Opus, Vorbis, FLAC, Speex, a chained
file), each as one fuzz input (fuzz_audio_flacogg.decode) in one chunk and a byte at a time.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from fuzz_audio_flacogg import Flac, Ogg, encode

HERE = pathlib.Path(__file__).resolve().parent / "corpus-flacogg"


def ffmpeg(seconds: float, rate: int, channels: int, *args: str) -> bytes:
    source = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={rate}:duration={seconds}"]
    return subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", *source, "-ac", str(channels),
                           *args, "pipe:1"], check=True, capture_output=True, timeout=60).stdout


def seeds() -> dict[str, bytes]:
    opus = ffmpeg(0.3, 48000, 1, "-c:a", "libopus", "-b:a", "24k", "-f", "ogg")
    opus2 = ffmpeg(0.2, 24000, 2, "-c:a", "libopus", "-b:a", "24k", "-serial_offset", "7", "-f", "ogg")
    files = {
        "flac-streamed-44100": (Flac, ffmpeg(0.3, 44100, 2, "-c:a", "flac", "-f", "flac")),
        "flac-streamed-11025-block100": (Flac, ffmpeg(0.2, 11025, 1, "-c:a", "flac", "-frame_size", "100",
                                                      "-f", "flac")),
        "flac-streamed-37800-block1000": (Flac, ffmpeg(0.2, 37800, 1, "-c:a", "flac", "-frame_size", "1000",
                                                       "-f", "flac")),
        "flac-streamed-12000": (Flac, ffmpeg(0.2, 12000, 1, "-c:a", "flac", "-f", "flac")),
        "ogg-opus": (Ogg, opus),
        "ogg-vorbis": (Ogg, ffmpeg(0.3, 22050, 1, "-c:a", "libvorbis", "-f", "ogg")),
        "ogg-flac": (Ogg, ffmpeg(0.2, 16000, 1, "-c:a", "flac", "-f", "ogg")),
        "ogg-speex": (Ogg, ffmpeg(0.3, 16000, 1, "-c:a", "libspeex", "-f", "ogg")),
        "ogg-chained": (Ogg, opus + opus2),
    }
    out = {}
    for name, (probe, body) in files.items():
        out[name] = encode(body, probe)
        out[name + "-bytewise"] = encode(body, probe, mode=1)
    # A FLAC file written to a seekable output: STREAMINFO with its total.
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "a.flac"
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                        "sine=sample_rate=8000:duration=0.3", "-c:a", "flac", str(path)], check=True, timeout=60)
        out["flac-declared"] = encode(path.read_bytes(), Flac, mode=3, seed=1)
    return out


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for old in HERE.iterdir():
        old.unlink()
    for name, data in seeds().items():
        (HERE / name).write_bytes(data)


if __name__ == "__main__":
    main()
