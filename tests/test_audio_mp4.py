"""The MP4/M4A duration probe (aisix/audio_mp4.py) against ffprobe, on files ffmpeg makes (moov
first or last, fragmented) and on those files with their boxes rewritten the ways other muxers
write them (64-bit sizes, an mdat of size 0, a moov larger than the probe may hold, a zero mvhd,
fragments with and without mehd, sample tables)."""

from __future__ import annotations

import importlib.util
import pathlib
import random
import subprocess
from collections.abc import Iterator

import pytest

from aisix.audio import STATE_LIMIT
from aisix.audio_mp4 import Mp4Probe, sniff
from tests.audio_files import FORMATS, close_enough, every_split_point, ffprobe_seconds, make, run, splits

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("aisix_fuzz_containers", ROOT / "fuzz" / "fuzz_audio_containers.py")
assert _spec is not None and _spec.loader is not None
fz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fz)

VARIANTS = [(fmt, rate, channels) for fmt in ("m4a-moov-last", "m4a-moov-first", "mp4-audio")
            for rate, channels in ((44100, 2), (22050, 1), (8000, 1))]


def boxes(data: bytes, at: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int, int]]:
    """(type, start, payload start, end) of each box in data[at:end]: written here, apart from
    the module's walk."""
    end = len(data) if end is None else end
    while at + 8 <= end:
        size, kind, head = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8], 8
        if size == 1:
            size, head = int.from_bytes(data[at + 8:at + 16], "big"), 16
        elif size == 0:
            size = end - at
        yield kind, at, at + head, at + size
        at += size


def box(data: bytes, *path: bytes) -> tuple[bytes, int, int, int]:
    """The first box at that path (b"moov", b"trak", ...)."""
    found, at, end = None, 0, len(data)
    for kind in path:
        found = next(b for b in boxes(data, at, end) if b[0] == kind)
        at, end = found[2], found[3]
    assert found is not None
    return found


def resized(data: bytes, path: tuple[bytes, ...], insert_at: int, insert: bytes) -> bytes:
    """data with `insert` put at offset insert_at, inside the boxes on `path`, their sizes grown."""
    out = bytearray(data[:insert_at] + insert + data[insert_at:])
    for depth in range(1, len(path) + 1):
        _, start, _, _ = box(data, *path[:depth])
        size = int.from_bytes(out[start:start + 4], "big")
        out[start:start + 4] = (size + len(insert)).to_bytes(4, "big")
    return bytes(out)


def answers(pieces: list[bytes]) -> tuple[float | None, float, float | None]:
    probe, end = run(Mp4Probe, pieces)
    return probe.declared, probe.at_least, end


def cuts(data: bytes, seed: int) -> list[list[bytes]]:
    """splits(): 20 random ways for a short file, 2 for a long one, and always 1-7 byte pieces."""
    return list(splits(data, seed, count=20 if len(data) < 65536 else 2))


@pytest.mark.parametrize(("fmt", "rate", "channels"), VARIANTS)
@pytest.mark.parametrize("seconds", [0.5, 3, 61])
def test_duration_matches_ffprobe_however_the_file_is_cut(fmt: str, rate: int, channels: int,
                                                          seconds: float) -> None:
    path = make(fmt, seconds, rate, channels)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    whole = answers([data])
    declared, at_least, end = whole
    assert close_enough(end, truth) and end == declared
    assert abs(end - truth) < 1e-6  # mvhd, which is what ffprobe reads
    assert at_least == 0.0   # the sample tables would be needed; see the module docstring
    for pieces in cuts(data, seed=int(seconds * rate)):
        assert answers(pieces) == whole


@pytest.mark.parametrize(("rate", "channels"), [(48000, 2), (44100, 2), (16000, 1)])
@pytest.mark.parametrize("seconds", [0.5, 7.3, 61])
def test_fragments_are_added_up_as_ffprobe_does(rate: int, channels: int, seconds: float) -> None:
    # Each fragment's trun: ffmpeg gives most samples tfhd's default duration and lists the last
    # fragment's durations one by one (its last sample is short); the sum over mdhd's timescale.
    path = make("m4a-fragmented", seconds, rate, channels)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    assert b"moof" in data and b"mehd" not in data
    declared, at_least, end = answers([data])
    assert declared is None and end is not None and abs(end - truth) < 1e-6 and at_least == end
    for pieces in cuts(data, seed=int(seconds * rate)):
        probe = Mp4Probe()
        seen = 0.0
        for piece in pieces:
            probe.feed(memoryview(piece))
            assert probe.at_least >= seen  # the fragments so far: it only grows
            seen = probe.at_least
        assert probe.end() == end


def test_only_the_audio_tracks_fragments_count() -> None:
    command = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
               "testsrc=size=64x64:rate=10:duration=4", "-f", "lavfi", "-i",
               "sine=frequency=440:sample_rate=48000:duration=4", "-c:v", "libx264", "-c:a", "aac",
               "-movflags", "frag_keyframe+empty_moov", "-frag_duration", "500000", "-f", "mp4", "pipe:1"]
    data = subprocess.run(command, check=True, capture_output=True, timeout=60).stdout
    _, _, end = answers([data])
    assert end is not None and abs(end - 4.2) < 1e-6  # ffprobe's audio stream: 4.2 s, the video 4.0


def test_fragments_whose_samples_have_no_duration_leave_it_unknown() -> None:
    # ffmpeg states the samples' duration in each tfhd (flag 0x08) and in trex. Without both (the
    # flag cleared, trex turned into a free box), nothing says how long a fragment's samples
    # are: the length is unknown, never a guess.
    out = bytearray(make("m4a-fragmented", 3).read_bytes())
    _, trex, _, _ = box(bytes(out), b"moov", b"mvex", b"trex")
    out[trex + 4:trex + 8] = b"free"
    for kind, _, payload, end in list(boxes(bytes(out))):
        if kind == b"moof":
            traf = next(b for b in boxes(bytes(out), payload, end) if b[0] == b"traf")
            tfhd = next(b for b in boxes(bytes(out), traf[2], traf[3]) if b[0] == b"tfhd")
            flags = int.from_bytes(out[tfhd[2] + 1:tfhd[2] + 4], "big")
            assert flags & 0x08
            out[tfhd[2] + 1:tfhd[2] + 4] = (flags & ~0x08).to_bytes(3, "big")
    assert answers([bytes(out)])[2] is None


@pytest.mark.parametrize("where", ["before moov", "inside moov", "inside another moof"])
def test_a_fragment_out_of_place_leaves_the_length_unknown(where: str) -> None:
    # Decoders disagree on these (ffmpeg reads a moof inside moov or inside another moof, and
    # none before moov): the fragments' sum is not an answer any more.
    data = make("m4a-fragmented", 3).read_bytes()
    top = list(boxes(data))
    moov = next(x for x in top if x[0] == b"moov")
    frag = next(x for x in top if x[0] == b"moof")
    piece = data[frag[1]:frag[3]]
    if where == "before moov":
        out = data[:moov[1]] + piece + data[moov[1]:frag[1]] + data[frag[3]:]
    elif where == "inside moov":
        out = resized(data[:frag[1]] + data[frag[3]:], (b"moov",), moov[3], piece)
    else:
        second = next(x for x in top if x[0] == b"moof" and x[1] > frag[1])
        cut = data[:second[1]] + data[second[3]:]
        out = resized(cut, (b"moof",), frag[3], data[second[1]:second[3]])
    assert answers([data])[2] is not None
    for pieces in cuts(out, seed=9):
        assert answers(pieces)[2] is None


def test_a_sample_table_that_does_not_fit_its_trun_makes_it_give_up() -> None:
    data = bytearray(make("m4a-fragmented", 3).read_bytes())
    moof = box(bytes(data), b"moof")
    trun = box(bytes(data), b"moof", b"traf", b"trun")
    data[trun[2] + 4:trun[2] + 8] = (1 << 30).to_bytes(4, "big")  # a billion samples in 200 bytes
    for pieces in cuts(bytes(data[:moof[3] + 64]), seed=5):
        probe, end = run(Mp4Probe, pieces)
        assert end is None and probe.at_least == 0.0


@pytest.mark.parametrize("fmt", ["m4a-moov-last", "m4a-moov-first", "m4a-fragmented"])
def test_every_split_point_in_the_headers(fmt: str) -> None:
    data = make(fmt, 1).read_bytes()
    whole = answers([data])
    for pieces in every_split_point(data):
        assert answers(pieces) == whole


@pytest.mark.parametrize("fmt", ["m4a-moov-last", "m4a-moov-first", "mp4-audio"])
def test_declared_is_set_as_moov_ends(fmt: str) -> None:
    path = make(fmt, 3)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    _, _, _, moov_end = box(data, b"moov")
    mdat = box(data, b"mdat")
    assert (mdat[1] > moov_end) is (fmt != "m4a-moov-last")
    probe = Mp4Probe()
    probe.feed(data[:moov_end - 1])
    assert probe.declared is None
    probe.feed(data[moov_end - 1:moov_end])
    assert probe.declared is not None and abs(probe.declared - truth) < 1e-6


def test_a_moov_larger_than_the_state_limit_costs_nothing() -> None:
    # A long file's sample tables make moov large (ten minutes of AAC: ~100 KB of stsz); the
    # probe skips them by size. A 256 KiB free box inside moov stands for them here.
    path = make("m4a-moov-last", 3)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    _, _, payload, _ = box(data, b"moov")
    padding = (8 + 256 * 1024).to_bytes(4, "big") + b"free" + bytes(256 * 1024)
    bigger = resized(data, (b"moov",), payload, padding)
    for pieces in cuts(bigger, seed=1):
        declared, _, end = answers(pieces)
        assert declared == end and end is not None and abs(end - truth) < 1e-6
    fz.check(bytes([0x01 | 0x0C, 3]) + bigger)  # the state stays bounded after every feed


def test_64_bit_sizes_and_a_size_0_mdat() -> None:
    path = make("m4a-moov-last", 3)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    _, start, payload, end = box(data, b"mdat")
    large = (data[:start] + b"\x00\x00\x00\x01mdat" + (end - start + 8).to_bytes(8, "big")
             + data[payload:])
    first = make("m4a-moov-first", 3).read_bytes()
    _, start, _, _ = box(first, b"mdat")
    assert start + (int.from_bytes(first[start:start + 4], "big")) == len(first)  # mdat is last
    to_end = first[:start] + bytes(4) + first[start + 4:]
    for variant in (large, to_end):
        for pieces in cuts(variant, seed=2):
            _, _, found = answers(pieces)
            assert found is not None and abs(found - truth) < 1e-6


def patch_duration(data: bytes, path: tuple[bytes, ...], at: int, length: int, value: int) -> bytes:
    """data with the version-0 duration field at payload offset `at` of the box on `path` set."""
    _, _, payload, _ = box(data, *path)
    assert data[payload] == 0  # version 0: ffmpeg writes 32-bit durations for short files
    return data[:payload + at] + value.to_bytes(length, "big") + data[payload + at + length:]


def test_a_zero_mvhd_falls_back_to_the_audio_track() -> None:
    path = make("m4a-moov-first", 3)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    no_mvhd = patch_duration(data, (b"moov", b"mvhd"), 16, 4, 0)
    assert answers([no_mvhd])[2] == pytest.approx(truth, abs=1e-6)  # tkhd: the same edit
    no_tkhd = patch_duration(no_mvhd, (b"moov", b"trak", b"tkhd"), 20, 4, 0)
    # mdhd counts every sample, the encoder's priming too (1024 samples): within tolerance.
    assert close_enough(answers([no_tkhd])[2], truth)
    unknown = patch_duration(no_tkhd, (b"moov", b"trak", b"mdia", b"mdhd"), 16, 4, 0xFFFFFFFF)
    assert answers([unknown])[2] is None


def test_a_fragmented_file_with_mehd_declares_its_duration_from_it() -> None:
    command = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
               "sine=frequency=440:sample_rate=44100:duration=3", "-c:a", "aac",
               "-movflags", "frag_keyframe+empty_moov", "-f", "mp4", "pipe:1"]
    data = subprocess.run(command, check=True, capture_output=True, timeout=60).stdout
    assert b"moof" in data and b"mehd" not in data
    declared, at_least, end = answers([data])
    assert declared is None and end == at_least and end is not None and abs(end - 3.0232) < 1e-3  # the fragments
    _, _, mvex_payload, _ = box(data, b"moov", b"mvex")
    _, _, mvhd, _ = box(data, b"moov", b"mvhd")
    scale = int.from_bytes(data[mvhd + 12:mvhd + 16], "big")
    mehd = (16).to_bytes(4, "big") + b"mehd" + bytes(4) + (3 * scale).to_bytes(4, "big")
    with_mehd = resized(data, (b"moov", b"mvex"), mvex_payload, mehd)
    for pieces in cuts(with_mehd, seed=3):
        declared, at_least, end = answers(pieces)
        assert declared == end == 3.0 and abs(at_least - 3.0232) < 1e-3  # stated, and counted


# -- hostile and truncated -------------------------------------------------------------------------

def test_truncated_files_have_no_duration_until_moov_is_whole() -> None:
    for fmt in ("m4a-moov-last", "m4a-moov-first"):
        path = make(fmt, 3)
        data, truth = path.read_bytes(), ffprobe_seconds(path)
        _, _, _, moov_end = box(data, b"moov")
        for cut in [*range(0, 1500, 5), *range(1500, len(data), 613)]:
            fz.check(bytes([0x0D, cut & 0xFF]) + data[:cut])
            _, _, end = answers([data[:cut]])
            assert (end is None) is (cut < moov_end), cut
            assert end is None or abs(end - truth) < 1e-6


@pytest.mark.timeout(30)
def test_random_mutations_never_raise_or_grow() -> None:
    rng = random.Random(14)
    files = [make("m4a-moov-first", 0.5, 8000, 1).read_bytes(), make("m4a-moov-last", 0.5, 8000, 1).read_bytes()]
    for _ in range(300):
        data = bytearray(rng.choice(files))
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(min(len(data), rng.choice([64, 1024, len(data)])))] = rng.randrange(256)
        fz.check(bytes([rng.choice([1, 3, 7, 11, 15]), rng.randrange(256)]) + bytes(data))


def b(kind: bytes, payload: bytes, size: int | None = None) -> bytes:
    return (len(payload) + 8 if size is None else size).to_bytes(4, "big") + kind + payload


MVHD = b(b"mvhd", bytes(12) + (1000).to_bytes(4, "big") + (2500).to_bytes(4, "big") + bytes(80))
FTYP = b(b"ftyp", b"M4A \x00\x00\x02\x00")


@pytest.mark.parametrize(("name", "data"), [
    ("a box smaller than its header", FTYP + b(b"free", b"", size=7) + b(b"moov", MVHD)),
    ("a box past its parent", FTYP + b(b"moov", b(b"free", bytes(8), size=100) + MVHD)),
    ("a size 0 inside moov", FTYP + b(b"moov", MVHD + b(b"trak", b"", size=0))),
    ("an mvhd of version 2", FTYP + b(b"moov", b(b"mvhd", b"\x02" + MVHD[9:]))),
    ("an mvhd too short", FTYP + b(b"moov", b(b"mvhd", bytes(12)))),
    ("a 64-bit size below its header", FTYP + b"\x00\x00\x00\x01moov" + (15).to_bytes(8, "big") + MVHD),
])
def test_what_no_muxer_writes_makes_it_give_up(name: str, data: bytes) -> None:
    assert answers([FTYP + b(b"moov", MVHD)]) == (2.5, 0.0, 2.5)  # the well-formed file
    for pieces in splits(data):
        probe, end = run(Mp4Probe, pieces)
        assert end is None and probe.declared is None, name
        probe.feed(bytes(1 << 20))
        assert len(probe._buf) == 0 and probe.end() is None


@pytest.mark.timeout(10)
def test_absurd_sizes_are_skipped_by_counting_not_by_reading() -> None:
    data = FTYP + b(b"moov", MVHD) + b"\x00\x00\x00\x01mdat" + (1 << 62).to_bytes(8, "big")
    probe = Mp4Probe()
    probe.feed(data)
    for _ in range(64):
        probe.feed(bytes(1 << 16))
    assert probe.end() == 2.5 and fz.state_size(probe) < STATE_LIMIT


def test_a_second_moov_is_not_believed() -> None:
    other = b(b"moov", b(b"mvhd", bytes(12) + (1000).to_bytes(4, "big") + (9000).to_bytes(4, "big") + bytes(80)))
    assert answers([FTYP + b(b"moov", MVHD) + other]) == (2.5, 0.0, 2.5)


def test_sniff_claims_mp4_and_m4a_only() -> None:
    for fmt in FORMATS:
        head = make(fmt, 0.5).read_bytes()[:64]
        assert sniff(head) is fmt.startswith(("m4a", "mp4")), fmt
    assert sniff(b(b"moov", b"")) and sniff(b"\x00\x00\x00\x00mdat")
    assert not sniff(b"\x00\x00\x00\x04ftyp") and not sniff(b"\x00\x00\x00\x18fty") and not sniff(b"")
