"""The FLAC duration probe (aisix/audio_flac.py) against ffprobe, on files ffmpeg makes: written to
a file (STREAMINFO states the total) and to a pipe (the total is 0: frames are counted), at rates
and block sizes whose frame headers carry them at their end, cut every way a stream may cut them;
then truncated, mutated and hostile files, which must never raise, grow or hang.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import random
import subprocess
import time
from functools import cache

import pytest

from aisix.audio import STATE_LIMIT
from aisix.audio_flac import Flac, sniff
from tests.audio_files import close_enough, every_split_point, ffprobe_seconds, make, run, splits

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_fuzz_module():
    spec = importlib.util.spec_from_file_location("aisix_fuzz_audio_flacogg", ROOT / "fuzz" / "fuzz_audio_flacogg.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fz = _load_fuzz_module()
STREAMINFO_END = 4 + 4 + 34  # "fLaC", the block header, STREAMINFO


@cache
def streamed(seconds: float, rate: int = 44100, channels: int = 2, *args: str) -> bytes:
    """FLAC as ffmpeg writes it to a pipe: it cannot seek back, so STREAMINFO's total stays 0."""
    source = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={rate}:duration={seconds}"]
    return subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", *source, "-ac", str(channels),
                           "-c:a", "flac", *args, "-f", "flac", "pipe:1"],
                          check=True, capture_output=True, timeout=120).stdout


@cache
def packets_seconds(data: bytes) -> float:
    """ffprobe's reading of the frames themselves: the last packet's end (the duration ffprobe's
    format level does not give for a streamed FLAC)."""
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "packet=pts_time,duration_time",
                          "-of", "json", "-i", "pipe:0"], input=data, check=True, capture_output=True, timeout=60)
    last = json.loads(out.stdout)["packets"][-1]
    return float(last["pts_time"]) + float(last["duration_time"])


def total_samples(data: bytes) -> int:
    return int.from_bytes(data[18:26], "big") & (1 << 36) - 1


def without_total(data: bytes) -> bytes:
    """The file with STREAMINFO's total samples patched to 0 (unknown)."""
    patched = bytearray(data)
    patched[21] &= 0xF0
    patched[22:26] = bytes(4)
    return bytes(patched)


def answers(data: bytes, pieces: list[bytes] | None = None) -> tuple[float | None, float, float | None]:
    probe, result = run(Flac, pieces or [data])
    return probe.declared, probe.at_least, result


# (seconds, rate, channels): a second is 1 to 20 frames; 61 s crosses a minute of frames.
DECLARED = [(0.5, 44100, 2), (3, 44100, 2), (61, 44100, 2), (3, 8000, 1), (3, 24000, 1), (2, 48000, 6),
            (2, 11025, 1), (2, 96000, 2)]


@pytest.mark.parametrize(("seconds", "rate", "channels"), DECLARED)
def test_a_file_with_a_total_is_declared_and_counted(seconds: float, rate: int, channels: int) -> None:
    path = make("flac", seconds, rate, channels)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    assert total_samples(data)
    for pieces in splits(data, seed=int(seconds * rate)):
        declared, at_least, result = answers(data, pieces)
        assert close_enough(declared, truth) and close_enough(result, truth), (declared, result, truth)
        assert at_least <= truth
    # The frames alone give the same duration: the same file, its total patched away.
    assert close_enough(answers(without_total(data))[2], truth)


# Streamed FLAC: (seconds, rate, channels, extra ffmpeg arguments). 11025 Hz puts the rate in 16
# bits at the header's end, 12000 Hz in 8 bits (kHz), 37800 Hz in 16 bits (tens of Hz); a block
# of 100 samples is coded in 8 bits at the end, 1000 in 16; every last frame's short block too.
STREAMED = [
    (0.5, 44100, 2, ()), (3, 44100, 2, ()), (61, 44100, 2, ()), (3, 24000, 1, ()), (3, 16000, 1, ()),
    (2, 11025, 1, ()), (2, 12000, 2, ()), (2, 37800, 2, ()), (2, 96000, 2, ("-sample_fmt", "s32")),
    (2, 48000, 6, ()), (2, 22050, 1, ("-frame_size", "100")), (2, 22050, 2, ("-frame_size", "1000")),
    (3, 8000, 1, ("-compression_level", "0")),
]


@pytest.mark.parametrize(("seconds", "rate", "channels", "args"), STREAMED)
def test_a_streamed_file_is_measured_from_its_frames(seconds: float, rate: int, channels: int,
                                                     args: tuple[str, ...]) -> None:
    data = streamed(seconds, rate, channels, *args)
    assert total_samples(data) == 0
    truth = packets_seconds(data)
    assert abs(truth - seconds) < 0.001
    for pieces in splits(data, seed=rate):
        declared, at_least, result = answers(data, pieces)
        assert declared is None
        assert result is not None and abs(result - truth) < 1e-6, (result, truth)  # frames are exact
        assert 0 < at_least <= truth


def test_ffprobe_gives_no_format_duration_for_a_streamed_file() -> None:
    # Why the frames must be counted: STREAMINFO says nothing, ffprobe's format level neither.
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "json", "-i",
                          "pipe:0"], input=streamed(3), check=True, capture_output=True, timeout=60)
    assert "duration" not in json.loads(out.stdout).get("format", {})


@pytest.mark.parametrize("kind", ["declared", "streamed"])
def test_every_split_point_in_the_first_4_kib(kind: str) -> None:
    data = make("flac", 3).read_bytes() if kind == "declared" else streamed(3)
    expected = answers(data)
    for pieces in every_split_point(data):
        assert answers(data, pieces) == expected


@pytest.mark.parametrize("kind", ["declared", "streamed"])
def test_declared_is_set_once_streaminfo_is_fed_and_at_least_only_grows(kind: str) -> None:
    data = make("flac", 3).read_bytes() if kind == "declared" else streamed(3)
    truth = 3.0
    probe = Flac()
    seen = []
    for at in range(len(data)):
        probe.feed(data[at:at + 1])
        seen.append(probe.declared)
        if at % 97 == 0 or at == len(data) - 1:
            assert probe.at_least <= truth
    if kind == "declared":
        assert seen[:STREAMINFO_END - 1] == [None] * (STREAMINFO_END - 1)
        assert set(seen[STREAMINFO_END - 1:]) == {3.0}
    else:
        assert set(seen) == {None}
    previous = 0.0
    probe = Flac()
    for start in range(0, len(data), 512):
        probe.feed(data[start:start + 512])
        assert previous <= probe.at_least <= truth
        previous = probe.at_least
    assert previous > 2.5  # all but the last frame or two


def _variable_blocksize(data: bytes) -> bytes:
    """The fixed-block-size stream rewritten as a variable one: each frame header says its first
    sample instead of its frame number (and its CRC-8 follows). The CRC-16 at each frame's end
    no longer holds; the probe does not read it."""
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "packet=pos,pts", "-of", "json", "-i",
                          "pipe:0"], input=data, check=True, capture_output=True, timeout=60)
    packets = [(int(p["pos"]), int(p["pts"])) for p in json.loads(out.stdout)["packets"]]
    result, at = bytearray(), 0
    for pos, sample in packets:
        result += data[at:pos]
        head = data[pos:pos + 16]
        first = head[4]
        extra = 0 if first < 0x80 else 7 - (first ^ 0xFF).bit_length()
        rest_start = 5 + extra
        code, rate_code = head[2] >> 4, head[2] & 15
        rest_len = ((1 if code == 6 else 2 if code == 7 else 0)
                    + (1 if rate_code == 12 else 2 if rate_code in (13, 14) else 0))
        new = bytearray([0xFF, 0xF9, head[2], head[3]]) + _utf8(sample) + head[rest_start:rest_start + rest_len]
        crc = 0
        for byte in new:
            crc ^= byte
            for _ in range(8):
                crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        result += new + bytes([crc])
        at = pos + rest_start + rest_len + 1
    return bytes(result + data[at:])


def _utf8(value: int) -> bytes:
    """FLAC's coding of a frame or sample number: UTF-8's scheme, stretched to 7 bytes (36 bits)."""
    if value < 0x80:
        return bytes([value])
    size = next(n for n in range(2, 8) if value < 1 << 5 * n + 1)  # 2 bytes hold 11 bits, 7 hold 36
    tail = [0x80 | value >> 6 * i & 0x3F for i in reversed(range(size - 1))]
    return bytes([(0xFF << 8 - size) & 0xFF | value >> 6 * (size - 1), *tail])


def test_a_variable_block_size_stream_counts_first_sample_numbers() -> None:
    data = _variable_blocksize(streamed(3, 44100, 2, "-frame_size", "1000"))
    for pieces in splits(data, seed=9, count=5):
        assert close_enough(answers(data, pieces)[2], 3.0)


def test_sniff() -> None:
    assert sniff(make("flac", 0.5).read_bytes()[:64])
    assert sniff(b"fLaC")
    assert not sniff(b"fLa")
    for fmt in ("wav", "mp3-cbr", "ogg-opus", "ogg-vorbis", "webm-opus", "m4a-moov-first", "aac-adts"):
        assert not sniff(make(fmt, 0.5).read_bytes()[:64]), fmt


# -- truncated, mutated and hostile input -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["declared", "streamed"])
def test_a_truncated_file_never_raises_and_never_overstates_what_it_holds(kind: str) -> None:
    data = make("flac", 3).read_bytes() if kind == "declared" else streamed(3)
    for cut in [*range(0, 200), *range(200, len(data), 613)]:
        head = data[:cut]
        result = fz.check(Flac, head, fz.cuts_of(4, cut, len(head)))
        if kind == "declared" and cut >= STREAMINFO_END:
            assert result == 3.0  # what STREAMINFO says, as ffprobe reads it
        elif kind == "streamed" and result is not None:
            assert result <= 3.0


def test_random_byte_flips_in_the_header_region_never_raise() -> None:
    rnd = random.Random(14)
    for data in (make("flac", 0.5).read_bytes(), streamed(0.5)):
        for _ in range(300):
            mutated = bytearray(data)
            for _ in range(rnd.randint(1, 8)):
                mutated[rnd.randrange(0, min(len(data), 300))] = rnd.randrange(256)
            fz.check(Flac, bytes(mutated), fz.cuts_of(rnd.randint(1, 6), rnd.randrange(256), len(mutated)))


def test_random_byte_flips_in_the_frames_change_little() -> None:
    # A damaged frame header is skipped; the frames after it still count.
    rnd = random.Random(15)
    data = streamed(3)
    for _ in range(50):
        mutated = bytearray(data)
        for _ in range(rnd.randint(1, 20)):
            mutated[rnd.randrange(STREAMINFO_END + 64, len(data))] = rnd.randrange(256)
        result = fz.check(Flac, bytes(mutated), fz.cuts_of(5, rnd.randrange(256), len(mutated)))
        assert result is not None and 2.8 <= result <= 3.0


def _streaminfo(rate: int = 44100, channels: int = 2, bits: int = 16, total: int = 0, last: bool = True,
                length: int = 34) -> bytes:
    packed = rate << 44 | (channels - 1) << 41 | (bits - 1) << 36 | total
    body = (4608).to_bytes(2, "big") * 2 + bytes(6) + packed.to_bytes(8, "big") + bytes(16)
    return bytes([0x80 if last else 0]) + length.to_bytes(3, "big") + body


HOSTILE = {
    "no streaminfo first": b"fLaC" + b"\x81\x00\x00\x04abcd" + _streaminfo(),
    "streaminfo too long": b"fLaC" + _streaminfo(length=35) + b"x",
    "rate 0": b"fLaC" + _streaminfo(rate=0),
    "block type 127": b"fLaC" + _streaminfo(last=False) + b"\x7f\x00\x00\x00",
    "second streaminfo": b"fLaC" + _streaminfo(last=False) + _streaminfo(),
    "a 16 MiB block then the end": b"fLaC" + _streaminfo(last=False) + b"\x06\xff\xff\xff" + bytes(1000),
    "endless small blocks": b"fLaC" + _streaminfo(last=False) + b"\x01\x00\x00\x00" * 20000,
    "not flac": b"fLaX" + _streaminfo(),
    "sync storm": b"fLaC" + _streaminfo() + b"\xff\xf8" * 50_000,
    "headers with bad crc": b"fLaC" + _streaminfo() + b"\xff\xf8\x69\x18\x00\x00" * 20_000,
    "numbers going back": b"fLaC" + _streaminfo() + b"\xff\xf8\x69\x18\x05\x00" * 1000,
    "huge total": b"fLaC" + _streaminfo(rate=1, total=(1 << 36) - 1),
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_headers_cost_neither_memory_nor_time(name: str) -> None:
    data = HOSTILE[name]
    started = time.perf_counter()
    for mode in (0, 1, 5):
        result = fz.check(Flac, data, fz.cuts_of(mode, 1, len(data)))
    elapsed = time.perf_counter() - started
    assert elapsed < 10 * max(1.0, len(data) / 2**20), elapsed  # byte by byte included
    if name in ("no streaminfo first", "streaminfo too long", "rate 0", "block type 127", "second streaminfo",
                "not flac", "sync storm", "headers with bad crc"):
        assert result is None, name
    if name == "huge total":
        assert result == float((1 << 36) - 1)


def test_the_state_stays_under_the_limit() -> None:
    assert fz.BOUNDS[Flac] <= STATE_LIMIT
    probe = Flac()
    data = streamed(3)
    for at in range(0, len(data), 3):
        probe.feed(data[at:at + 3])
        assert probe.held() <= 34


def test_a_probe_that_gave_up_ignores_the_rest() -> None:
    probe = Flac()
    probe.feed(b"RIFF....")
    probe.feed(streamed(0.5))
    assert probe.end() is None and probe.at_least == 0.0 and probe.declared is None


CORPUS = sorted((ROOT / "fuzz" / "corpus-flacogg").glob("flac-*"))


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_fuzz_corpus_replays(path: pathlib.Path) -> None:
    fz.test_one_input(path.read_bytes())
