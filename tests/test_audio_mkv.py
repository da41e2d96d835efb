"""The WebM/Matroska duration probe (aisix/audio_mkv.py) against ffprobe, on files ffmpeg makes.

Two kinds of file: seekable ones (ffmpeg goes back to write Duration, Cues and the sizes) and
live ones, written to a pipe as a browser's MediaRecorder or a live encoder writes them: no
Duration, a Segment of unknown size; ``mediarecorder()`` also gives every Cluster the unknown-size
marker, as Chrome does. ffprobe has no duration for a live file ("N/A"), so its truth is ffprobe's
reading of the same audio made seekable.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
import random
import struct
import subprocess
import tempfile

import pytest

from aisix.audio import STATE_LIMIT
from aisix.audio_mkv import MatroskaProbe, sniff
from tests.audio_files import FORMATS, close_enough, every_split_point, ffprobe_seconds, make, run, splits

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("aisix_fuzz_containers", ROOT / "fuzz" / "fuzz_audio_containers.py")
assert _spec is not None and _spec.loader is not None
fz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fz)

_TMP = pathlib.Path(tempfile.mkdtemp(prefix="aisix-mkv-"))
# (format, rate, channels): Opus is always 48 kHz inside, the input rate is resampled.
VARIANTS = [("webm-opus", 48000, 1), ("webm-opus", 44100, 2), ("webm-opus", 16000, 1),
            ("mka-vorbis", 44100, 2), ("mka-vorbis", 22050, 1), ("mka-vorbis", 8000, 1)]
LIVE = {  # name -> ffmpeg output arguments, written to a pipe and, for the truth, to a file
    "webm-opus": ["-c:a", "libopus", "-b:a", "48k", "-f", "webm"],
    "webm-opus-60ms": ["-c:a", "libopus", "-b:a", "32k", "-frame_duration", "60", "-f", "webm"],
    "webm-opus-10ms": ["-c:a", "libopus", "-b:a", "64k", "-frame_duration", "10", "-f", "webm"],
    "mka-vorbis": ["-c:a", "libvorbis", "-f", "matroska"],
}
CLUSTER = b"\x1f\x43\xb6\x75"
UNKNOWN_8 = b"\x01\xff\xff\xff\xff\xff\xff\xff"


@functools.cache
def live(name: str, seconds: float, rate: int = 48000, channels: int = 1) -> tuple[bytes, float]:
    """(the file written to a pipe, ffprobe's duration of the same audio written to a file)."""
    source = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={rate}:duration={seconds}",
              "-ac", str(channels)]
    command = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *source, *LIVE[name]]
    piped = subprocess.run([*command, "pipe:1"], check=True, capture_output=True, timeout=120).stdout
    twin = _TMP / f"{name}-{seconds}-{rate}-{channels}.mkv"
    subprocess.run([*command, str(twin)], check=True, timeout=120)
    return piped, ffprobe_seconds(twin)


def ffprobe_says(data: bytes) -> str:
    """ffprobe's format duration of these bytes, as it prints it ("N/A" when it cannot tell)."""
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "json", "-"],
                         input=data, check=True, capture_output=True, timeout=60)
    return str(json.loads(out.stdout)["format"].get("duration", "N/A"))


def vint(data: bytes, at: int) -> tuple[int, int]:
    """(value, length) of the EBML vint at data[at]: written here, apart from the module's."""
    first = data[at]
    length = next(n for n in range(1, 9) if first & (0x80 >> (n - 1)))
    value = first & ((0x80 >> (length - 1)) - 1)
    for byte in data[at + 1:at + length]:
        value = value << 8 | byte
    return value, length


def mediarecorder(data: bytes) -> bytes:
    """The file with every Cluster's size replaced by the unknown-size marker (Chrome writes its
    Clusters so: it cannot go back to fill sizes in). The Segment must already be of unknown size."""
    out, at = bytearray(), 0
    while (found := data.find(CLUSTER, at)) >= 0:
        _, length = vint(data, found + 4)
        out += data[at:found + 4] + UNKNOWN_8
        at = found + 4 + length
    return bytes(out + data[at:])


def duration_end(data: bytes) -> int:
    """The offset just past the Info element, where Duration is (ffmpeg: 8-byte float)."""
    duration = data.index(b"\x44\x89\x88")
    info = data.rindex(b"\x15\x49\xa9\x66", 0, duration)  # not the SeekHead's mention of it
    size, length = vint(data, info + 4)
    assert info + 4 + length < duration < info + 4 + length + size
    return info + 4 + length + size


def cuts(data: bytes, seed: int) -> list[list[bytes]]:
    """splits(): 20 random ways for a short file, 2 for a long one, and always 1-7 byte pieces."""
    return list(splits(data, seed, count=20 if len(data) < 65536 else 2))


def answers(pieces: list[bytes]) -> tuple[float | None, float, float | None]:
    probe, end = run(MatroskaProbe, pieces)
    return probe.declared, probe.at_least, end


# -- seekable files: Duration ---------------------------------------------------------------------

@pytest.mark.parametrize(("fmt", "rate", "channels"), VARIANTS)
@pytest.mark.parametrize("seconds", [0.5, 3, 61])
def test_duration_matches_ffprobe_however_the_file_is_cut(fmt: str, rate: int, channels: int,
                                                          seconds: float) -> None:
    path = make(fmt, seconds, rate, channels)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    whole = answers([data])
    declared, at_least, end = whole
    assert declared == truth  # ffprobe's format duration is the Duration element
    assert close_enough(end, truth) and end == declared
    assert seconds - 0.1 < at_least <= truth
    for pieces in cuts(data, seed=int(seconds * rate)):
        assert answers(pieces) == whole


@pytest.mark.parametrize("fmt", ["webm-opus", "mka-vorbis"])
def test_every_split_point_in_the_headers(fmt: str) -> None:
    data = make(fmt, 1).read_bytes()
    whole = answers([data])
    for pieces in every_split_point(data):
        assert answers(pieces) == whole


@pytest.mark.parametrize("fmt", ["webm-opus", "mka-vorbis"])
def test_declared_is_set_as_the_info_element_ends(fmt: str) -> None:
    path = make(fmt, 3)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    probe = MatroskaProbe()
    first = None
    for at in range(len(data)):
        probe.feed(data[at:at + 1])
        if probe.declared is not None:
            first = at + 1
            break
    assert first == duration_end(data)
    assert probe.declared == truth


@pytest.mark.parametrize("fmt", ["webm-opus", "mka-vorbis"])
def test_at_least_grows_and_never_passes_the_truth(fmt: str) -> None:
    path = make(fmt, 20)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    probe, seen = MatroskaProbe(), [0.0]
    for at in range(0, len(data), 4096):
        probe.feed(data[at:at + 4096])
        seen.append(probe.at_least)
    assert seen == sorted(seen) and seen[-1] <= truth
    assert seen[len(seen) // 2] > 5  # counted while streaming, not only at the end


# -- live files: no Duration -----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(LIVE))
@pytest.mark.parametrize(("seconds", "rate", "channels"), [(0.5, 48000, 1), (3, 44100, 2), (61, 16000, 1)])
def test_a_live_file_is_timed_by_its_last_block(name: str, seconds: float, rate: int, channels: int) -> None:
    data, truth = live(name, seconds, rate, channels)
    assert b"\x44\x89" not in data[:data.index(CLUSTER)]  # no Duration: ffmpeg could not go back
    for variant in (data, mediarecorder(data)):
        whole = answers([variant])
        declared, at_least, end = whole
        assert declared is None
        assert close_enough(end, truth), (end, truth)
        assert at_least <= truth
        for pieces in cuts(variant, seed=int(seconds)):
            assert answers(pieces) == whole


def test_ffprobe_has_no_duration_for_a_live_file_but_the_probe_has() -> None:
    data, truth = live("webm-opus", 3)
    assert ffprobe_says(data) == "N/A"
    _, _, end = answers([mediarecorder(data)])
    # Opus: the last frame's length from its TOC byte, less the DiscardPadding the encoder wrote.
    assert end is not None and abs(end - truth) < 0.002


@pytest.mark.parametrize("name", ["webm-opus", "mka-vorbis"])
def test_every_split_point_of_a_mediarecorder_file(name: str) -> None:
    data = mediarecorder(live(name, 1)[0])
    whole = answers([data])
    for pieces in every_split_point(data):
        assert answers(pieces) == whole


def test_an_unknown_size_cluster_ends_at_the_next_top_level_element() -> None:
    data = mediarecorder(live("webm-opus", 3)[0])
    # Cues and Tags after the last Cluster are not blocks of it: the Cluster ends where they begin.
    tags = b"\x12\x54\xc3\x67" + b"\x85" + b"\xec\x83\x00\x00\x00"
    cues = b"\x1c\x53\xbb\x6b" + b"\x80"
    assert answers([data + tags + cues]) == answers([data])


def test_a_duration_shorter_than_the_blocks_is_not_believed() -> None:
    data = bytearray(make("webm-opus", 3).read_bytes())
    at = data.index(b"\x44\x89\x88") + 3
    data[at:at + 8] = struct.pack(">d", 500.0)  # half a second, for 3 s of blocks
    declared, at_least, end = answers([bytes(data)])
    assert declared == 0.5
    assert end == at_least and end > 2.9


# -- hostile and truncated -------------------------------------------------------------------------

def test_truncated_files_give_an_answer_or_none_and_stay_bounded() -> None:
    path = make("webm-opus", 3)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    live_data = mediarecorder(live("webm-opus", 3)[0])
    for source in (data, live_data):
        for cut in [*range(0, 700, 3), *range(700, len(source), 997)]:
            fz.check(bytes([0x0C, cut & 0xFF]) + source[:cut])
            declared, at_least, end = answers([source[:cut]])
            assert end is None or end >= at_least
            if source is data and cut >= duration_end(data):
                assert declared == end == truth  # what the header said, as ffprobe would


@pytest.mark.timeout(30)
def test_random_mutations_never_raise_or_grow() -> None:
    rng = random.Random(14)
    files = [make("webm-opus", 0.5).read_bytes(), make("mka-vorbis", 0.5, 22050, 1).read_bytes(),
             mediarecorder(live("webm-opus", 0.5)[0])]
    for _ in range(300):
        data = bytearray(rng.choice(files))
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(min(len(data), rng.choice([64, 512, 4096])))] = rng.randrange(256)
        fz.check(bytes([rng.choice([0, 2, 6, 10, 14]), rng.randrange(256)]) + bytes(data))


def segment(*children: bytes, size: bytes | None = None) -> bytes:
    body = b"".join(children)
    return (b"\x1a\x45\xdf\xa3\x84\x42\x86\x81\x01" + b"\x18\x53\x80\x67"
            + (size if size is not None else b"\x01" + len(body).to_bytes(7, "big")) + body)


def element(eid: bytes, payload: bytes) -> bytes:
    return eid + b"\x01" + len(payload).to_bytes(7, "big") + payload


INFO = element(b"\x15\x49\xa9\x66", element(b"\x2a\xd7\xb1", (1_000_000).to_bytes(3, "big"))
               + element(b"\x44\x89", struct.pack(">d", 2000.0)))


@pytest.mark.parametrize(("name", "data"), [
    ("an ID of more than 4 bytes", segment(INFO, b"\x08\x00\x00\x00\x00\x81\x00")),
    ("a zero byte where a size starts", segment(INFO, b"\xec\x00\x00")),
    ("a child past its parent", segment(element(b"\x15\x49\xa9\x66", b"\xec\x88\x00\x00"))),
    ("an unknown-size Info", segment(b"\x15\x49\xa9\x66\xff" + INFO)),
    ("an unknown-size Void", segment(INFO, b"\xec\xff" + bytes(100))),
    ("a block before its Cluster's Timecode", segment(INFO, element(b"\x1f\x43\xb6\x75",
                                                                    element(b"\xa3", b"\x81\x00\x00\x80\x00")))),
    ("a zero TimecodeScale", segment(element(b"\x15\x49\xa9\x66", element(b"\x2a\xd7\xb1", b"\x00")))),
    ("a NaN Duration", segment(element(b"\x15\x49\xa9\x66", element(b"\x44\x89", struct.pack(">d", float("nan")))))),
    ("a Duration of 3 bytes", segment(element(b"\x15\x49\xa9\x66", element(b"\x44\x89", b"\x00\x00\x01")))),
    ("an integer of 9 bytes", segment(element(b"\x15\x49\xa9\x66", element(b"\x2a\xd7\xb1", bytes(9))))),
])
def test_what_no_muxer_writes_makes_it_give_up(name: str, data: bytes) -> None:
    for pieces in splits(data):
        probe, end = run(MatroskaProbe, pieces)
        assert end is None and probe.declared is None, name
        probe.feed(bytes(1 << 20))  # ignored: nothing grows, nothing is parsed
        assert len(probe._buf) == 0 and probe.end() is None


@pytest.mark.timeout(10)
def test_absurd_sizes_are_skipped_by_counting_not_by_reading() -> None:
    huge = b"\x01\xff\xff\xff\xff\xff\xff\xfe"  # 2**56 - 2 bytes: one below the unknown marker
    data = segment(INFO, b"\xec" + huge, size=UNKNOWN_8)   # a Void nobody will ever finish
    probe = MatroskaProbe()
    probe.feed(data)
    for _ in range(64):
        probe.feed(bytes(1 << 16))
    assert probe.declared == 2.0 and probe.end() == 2.0
    assert fz.state_size(probe) < STATE_LIMIT


def test_a_minimal_file_built_by_hand() -> None:
    """Every path of a block: SimpleBlock, BlockGroup with BlockDuration, DefaultDuration, lacing."""
    track = element(b"\xae", element(b"\xd7", b"\x01") + element(b"\x86", b"A_PCM")
                    + element(b"\x23\xe3\x83", (10_000_000).to_bytes(4, "big")))   # 10 ms frames
    tracks = element(b"\x16\x54\xae\x6b", track)
    info = element(b"\x15\x49\xa9\x66", element(b"\x2a\xd7\xb1", (1_000_000).to_bytes(3, "big")))
    simple = element(b"\xa3", b"\x81\x00\x00\x80" + bytes(40))                  # t=1000 ms, 10 ms

    def laced(at: int) -> bytes:  # 4 frames of 10 ms
        return element(b"\xa3", b"\x81" + at.to_bytes(2, "big") + b"\x82\x03" + bytes(40))

    def group(at: int) -> bytes:  # 500 ms by its BlockDuration
        return element(b"\xa0", element(b"\xa1", b"\x81" + at.to_bytes(2, "big") + b"\x00" + bytes(40))
                       + element(b"\x9b", (500).to_bytes(2, "big")))

    # Only the track's last block is measured: frames of one audio track do not overlap.
    for blocks, at_least, end in ((simple, 1.0, 1.01), (simple + group(10) + laced(20), 1.02, 1.06),
                                  (simple + laced(10) + group(20), 1.02, 1.52)):
        cluster = element(b"\x1f\x43\xb6\x75", element(b"\xe7", (1000).to_bytes(2, "big")) + blocks)
        data = segment(info, tracks, cluster, size=UNKNOWN_8)
        for pieces in every_split_point(data, limit=len(data)):
            assert answers(pieces) == (None, at_least, end)


# -- sniff -----------------------------------------------------------------------------------------

def test_sniff_claims_matroska_and_webm_only() -> None:
    for fmt in FORMATS:
        head = make(fmt, 0.5).read_bytes()[:64]
        assert sniff(head) is (fmt in ("webm-opus", "mka-vorbis")), fmt
    assert sniff(live("webm-opus", 0.5)[0][:64])
    assert not sniff(b"\x1a\x45\xdf") and not sniff(b"")


def test_a_run_of_blocks_reads_as_one_block_at_a_time() -> None:
    """SimpleBlocks that lie whole in one chunk are timed in one pass (MatroskaProbe._run); fed in
    5-byte pieces every block goes the general walk. Both read the same, whatever the blocks: two
    tracks interleaved, a tick that goes back or repeats, 1-, 2- and 8-byte sizes, a Cluster that
    ends between blocks and one whose last block runs past its end."""
    def block(track: int, at: int, frame: int = 40, wide: bool = False) -> bytes:
        payload = bytes([0x80 | track]) + at.to_bytes(2, "big", signed=True) + b"\x80" + bytes(frame)
        if wide:
            return element(b"\xa3", payload)
        size = len(payload)
        return b"\xa3" + (bytes([0x80 | size]) if size < 127 else (0x4000 | size).to_bytes(2, "big")) + payload

    def cluster(start: int, blocks: bytes, size: bytes | None = None) -> bytes:
        body = element(b"\xe7", start.to_bytes(2, "big")) + blocks
        return CLUSTER + (size if size is not None else b"\x01" + len(body).to_bytes(7, "big")) + body

    one = b"".join(block(1, 20 * k) for k in range(40))
    cases = {
        "one track": segment(cluster(1000, one), size=UNKNOWN_8),
        "8-byte sizes": segment(cluster(1000, b"".join(block(1, 20 * k, wide=True) for k in range(40))),
                                size=UNKNOWN_8),
        "large frames": segment(cluster(1000, b"".join(block(1, 20 * k, frame=300) for k in range(20))),
                                size=UNKNOWN_8),
        "two tracks": segment(cluster(1000, b"".join(block(1 + k % 2, 10 * k) for k in range(40))),
                              size=UNKNOWN_8),
        "ticks back and again": segment(cluster(1000, b"".join(block(1, at) for at in
                                                               (0, 20, 40, 30, 60, 60, 50, 80, -5, 100))),
                                        size=UNKNOWN_8),
        "two clusters": segment(cluster(1000, one), cluster(2000, one[:len(one) // 2]), size=UNKNOWN_8),
        "unknown-size clusters": segment(cluster(1000, one, UNKNOWN_8), cluster(2000, one, UNKNOWN_8),
                                         size=UNKNOWN_8),
        "with Duration": segment(INFO, cluster(1000, one), size=UNKNOWN_8),
    }
    past = cluster(1000, one)
    cut = past[:4] + b"\x01" + (len(past) - 12 - 30).to_bytes(7, "big") + past[12:]  # the last block overruns
    cases["a block past its cluster"] = segment(cut, size=UNKNOWN_8)
    for name, data in cases.items():
        whole = answers([data])
        assert whole == answers([data[i:i + 5] for i in range(0, len(data), 5)]), name
        assert whole == answers([data[:len(data) // 3], data[len(data) // 3:]]), name
    assert answers([cases["one track"]]) == (None, 1.78, pytest.approx(1.8))
    assert answers([cases["a block past its cluster"]])[2] is None
