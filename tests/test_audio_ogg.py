"""The OGG duration probe (aisix/audio_ogg.py) against ffprobe, on files ffmpeg makes: Opus and
Vorbis at several rates and lengths, FLAC and Speex in OGG, two streams in one file, chained files,
cut every way a stream may cut them; then truncated, mutated and hostile files, which must never
raise, grow or hang.
"""

from __future__ import annotations

import importlib.util
import pathlib
import random
import subprocess
import time
from functools import cache

import pytest

from aisix.audio import STATE_LIMIT
from aisix.audio_ogg import Ogg, sniff
from tests.audio_files import close_enough, every_split_point, ffprobe_seconds, make, run, splits

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_fuzz_module():
    spec = importlib.util.spec_from_file_location("aisix_fuzz_audio_flacogg", ROOT / "fuzz" / "fuzz_audio_flacogg.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fz = _load_fuzz_module()


@cache
def made(name: str, *args: str) -> pathlib.Path:
    """An OGG file ffmpeg writes from the given input and output arguments (cached per session)."""
    out = pathlib.Path(make("wav", 0.5).parent) / f"ogg-{name}.ogg"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args, str(out)], check=True, timeout=120)
    return out


def sine(seconds: float, rate: int = 44100, frequency: int = 440) -> list[str]:
    return ["-f", "lavfi", "-i", f"sine=frequency={frequency}:sample_rate={rate}:duration={seconds}"]


def answers(data: bytes, pieces: list[bytes] | None = None) -> tuple[float | None, float, float | None]:
    probe, result = run(Ogg, pieces or [data])
    return probe.declared, probe.at_least, result


VARIANTS = [("ogg-opus", 0.5, 48000, 2), ("ogg-opus", 3, 48000, 2), ("ogg-opus", 61, 48000, 2),
            ("ogg-opus", 3, 24000, 1), ("ogg-opus", 3, 16000, 1), ("ogg-opus", 2, 44100, 2),
            ("ogg-vorbis", 0.5, 44100, 2), ("ogg-vorbis", 3, 44100, 2), ("ogg-vorbis", 61, 44100, 2),
            ("ogg-vorbis", 3, 22050, 1), ("ogg-vorbis", 3, 8000, 1), ("ogg-vorbis", 2, 48000, 2)]


@pytest.mark.parametrize(("fmt", "seconds", "rate", "channels"), VARIANTS)
def test_opus_and_vorbis_against_ffprobe(fmt: str, seconds: float, rate: int, channels: int) -> None:
    path = make(fmt, seconds, rate, channels)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    expected = answers(data)
    assert expected[0] is None  # nothing in OGG states a duration up front
    assert close_enough(expected[2], truth), (expected, truth)
    assert expected[1] == expected[2]  # every page was whole
    for pieces in splits(data, seed=rate + int(seconds)):
        assert answers(data, pieces) == expected


def test_opus_pre_skip_is_not_counted() -> None:
    # ffprobe's format duration counts the encoder's pre-skip (312 samples at 48 kHz: 6.5 ms);
    # the probe counts what is played, as the Opus mapping (RFC 7845) says.
    path = make("ogg-opus", 3)
    assert abs(ffprobe_seconds(path) - 3.0065) < 1e-4
    assert answers(path.read_bytes())[2] == 3.0


@pytest.mark.parametrize(("name", "args"), [
    ("flac", [*sine(2.5, 16000), "-c:a", "flac"]),
    ("flac-stereo", [*sine(1.5, 44100), "-ac", "2", "-c:a", "flac"]),
    ("speex-8k", [*sine(2.5, 8000), "-c:a", "libspeex"]),
    ("speex-16k", [*sine(2.5, 16000), "-c:a", "libspeex"]),
    ("two-streams", [*sine(3), *sine(5, 44100, 300), "-map", "0", "-map", "1", "-c:a", "libopus"]),
    ("vorbis-and-opus", [*sine(4), *sine(2, 44100, 300), "-map", "0", "-map", "1", "-c:a:0", "libvorbis",
                         "-c:a:1", "libopus"]),
    ("theora-and-vorbis", ["-f", "lavfi", "-i", "testsrc=duration=2:size=32x32:rate=5", *sine(3),
                           "-c:v", "libtheora", "-c:a", "libvorbis"]),
])
def test_other_codecs_and_several_streams_against_ffprobe(name: str, args: list[str]) -> None:
    path = made(name, *args)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    expected = answers(data)
    assert close_enough(expected[2], truth), (expected, truth)
    for pieces in splits(data, seed=len(data), count=5):
        assert answers(data, pieces) == expected


def test_a_video_only_file_has_no_duration() -> None:
    path = made("theora", "-f", "lavfi", "-i", "testsrc=duration=2:size=32x32:rate=5", "-c:v", "libtheora")
    assert answers(path.read_bytes()) == (None, 0.0, None)


def test_chained_links_add_up() -> None:
    # cat a.ogg b.ogg c.ogg: a legal chained OGG (distinct serials). ffmpeg plays every link;
    # ffprobe's format duration is one link's, not their sum.
    first = made("link-1", *sine(3), "-c:a", "libopus")
    second = made("link-2", *sine(2, 24000), "-c:a", "libopus", "-serial_offset", "1000")
    third = made("link-3", *sine(1.5, 22050), "-c:a", "libvorbis", "-serial_offset", "2000")
    data = first.read_bytes() + second.read_bytes() + third.read_bytes()
    chained = first.parent / "ogg-chained.ogg"
    chained.write_bytes(data)
    assert ffprobe_seconds(chained) < 3.1
    links = sum(ffprobe_seconds(path) for path in (first, second, third))
    for pieces in splits(data, seed=5, count=5):
        result = answers(data, pieces)[2]
        assert result == 6.5 and close_enough(result, links)


def test_every_split_point_in_the_first_4_kib() -> None:
    for fmt in ("ogg-opus", "ogg-vorbis"):
        data = make(fmt, 3).read_bytes()
        expected = answers(data)
        for pieces in every_split_point(data):
            assert answers(data, pieces) == expected


@pytest.mark.parametrize("fmt", ["ogg-opus", "ogg-vorbis"])
def test_at_least_only_grows_and_never_passes_the_truth(fmt: str) -> None:
    path = make(fmt, 3)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    probe, previous, steps = Ogg(), 0.0, []
    for start in range(0, len(data), 256):
        probe.feed(data[start:start + 256])
        assert previous <= probe.at_least <= truth
        assert probe.declared is None
        previous = probe.at_least
        steps.append(previous)
    assert len(set(steps)) > 2  # it moves as the pages go past, not only at the end


def test_sniff() -> None:
    assert sniff(make("ogg-opus", 0.5).read_bytes()[:64])
    assert sniff(b"OggS")
    assert not sniff(b"Ogg")
    for fmt in ("wav", "mp3-cbr", "flac", "webm-opus", "m4a-moov-first", "aac-adts"):
        assert not sniff(make(fmt, 0.5).read_bytes()[:64]), fmt


# -- truncated, mutated and hostile input -----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["ogg-opus", "ogg-vorbis"])
def test_a_truncated_file_never_raises_and_never_overstates(fmt: str) -> None:
    path = make(fmt, 3)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    for cut in [*range(0, 300, 3), *range(300, len(data), 409)]:
        head = data[:cut]
        result = fz.check(Ogg, head, fz.cuts_of(4, cut, len(head)))
        assert result is None or result <= truth


def test_random_byte_flips_in_the_header_region_never_raise() -> None:
    rnd = random.Random(14)
    for fmt in ("ogg-opus", "ogg-vorbis"):
        data = make(fmt, 0.5).read_bytes()
        for _ in range(200):
            mutated = bytearray(data)
            for _ in range(rnd.randint(1, 8)):
                mutated[rnd.randrange(0, min(len(data), 400))] = rnd.randrange(256)
            fz.check(Ogg, bytes(mutated), fz.cuts_of(rnd.randint(1, 6), rnd.randrange(256), len(mutated)))


def test_random_byte_flips_anywhere_never_raise() -> None:
    rnd = random.Random(15)
    data = make("ogg-vorbis", 3).read_bytes()
    for _ in range(60):
        mutated = bytearray(data)
        for _ in range(rnd.randint(1, 30)):
            mutated[rnd.randrange(len(data))] = rnd.randrange(256)
        fz.check(Ogg, bytes(mutated), fz.cuts_of(5, rnd.randrange(256), len(mutated)))


def pages(data: bytes) -> list[bytes]:
    """The file's pages, split by their segment tables (a test-side reading of the format)."""
    out, at = [], 0
    while at < len(data):
        count = data[at + 26]
        size = 27 + count + sum(data[at + 27:at + 27 + count])
        out.append(data[at:at + size])
        at += size
    return out


def test_junk_between_pages_is_skipped() -> None:
    path = make("ogg-opus", 3)
    data, truth = path.read_bytes(), 3.0
    split_pages = pages(data)
    assert b"".join(split_pages) == data and len(split_pages) > 4
    junk = bytes(random.Random(1).randrange(256) for _ in range(5000)).replace(b"OggS", b"oggs")
    damaged = b"".join(split_pages[:3]) + junk + b"".join(split_pages[3:])
    result = fz.check(Ogg, damaged, fz.cuts_of(5, 3, len(damaged)))
    assert close_enough(result, truth)
    # Junk after the first page's header; before any stream is known: nothing to go by.
    assert fz.check(Ogg, split_pages[0][:20] + junk, []) is None


def _page(body: bytes, granule: int = 0, serial: int = 1, flags: int = 0, segments: bytes | None = None) -> bytes:
    if segments is None:
        segments = bytes([255] * (len(body) // 255) + [len(body) % 255])
    return (b"OggS\x00" + bytes([flags]) + granule.to_bytes(8, "little", signed=True) + serial.to_bytes(4, "little")
            + bytes(8) + bytes([len(segments)]) + segments + body)


OPUS_HEAD = b"OpusHead\x01\x01\x38\x01\x80\xbb\x00\x00\x00\x00\x00"
HOSTILE = {
    "unknown codec": _page(b"\x80theora" + bytes(50), flags=2) + _page(bytes(100), granule=48000),
    "no granule ever": _page(OPUS_HEAD, granule=-1, flags=2) + _page(bytes(100), granule=-1) * 100,
    "a granule far off": _page(OPUS_HEAD, flags=2) + _page(bytes(10), granule=(1 << 63) - 1),
    "pages without segments": _page(OPUS_HEAD, flags=2) + _page(b"", granule=48000, segments=b"") * 5000,
    "max pages": _page(OPUS_HEAD, flags=2) + _page(bytes(255 * 255), granule=96312, segments=b"\xff" * 255) * 4,
    "a segment table cut short": _page(OPUS_HEAD, flags=2) + b"OggS\x00\x00" + bytes(20) + b"\xff" + b"\x10" * 5,
    "junk after the first page": _page(OPUS_HEAD, flags=2) + b"x" * 300_000,
    "false page heads everywhere": _page(OPUS_HEAD, flags=2) + b"OggS\x01" * 50_000,
    "first streams forever": b"".join(_page(OPUS_HEAD, flags=2, serial=n) for n in range(2000)),
    "vorbis rate 0": _page(b"\x01vorbis" + bytes(30), flags=2) + _page(bytes(10), granule=100),
    "opus version 16": _page(OPUS_HEAD[:8] + b"\x10" + OPUS_HEAD[9:], flags=2) + _page(bytes(10), granule=100),
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_pages_cost_neither_memory_nor_time(name: str) -> None:
    data = HOSTILE[name]
    started = time.perf_counter()
    for mode in (0, 1, 5):
        result = fz.check(Ogg, data, fz.cuts_of(mode, 1, len(data)))
    assert time.perf_counter() - started < 10 * max(1.0, len(data) / 2**20)
    if name in ("unknown codec", "no granule ever", "junk after the first page", "vorbis rate 0",
                "opus version 16", "false page heads everywhere"):
        assert result is None, (name, result)
    elif name == "pages without segments":
        assert result == 1.0 - 312 / 48000
    elif name == "max pages":
        assert result == 2.0
    elif name == "first streams forever":
        assert result == 0.0


def test_the_state_stays_under_the_limit() -> None:
    assert fz.BOUNDS[Ogg] <= STATE_LIMIT
    data = make("ogg-vorbis", 3).read_bytes()
    probe = Ogg()
    for at in range(0, len(data), 5):
        probe.feed(data[at:at + 5])
        assert probe.held() <= 27 + 255


def test_a_probe_that_gave_up_ignores_the_rest() -> None:
    probe = Ogg()
    probe.feed(b"OggS\x01" + bytes(40))
    probe.feed(make("ogg-opus", 0.5).read_bytes())
    assert probe.end() is None and probe.at_least == 0.0


CORPUS = sorted((ROOT / "fuzz" / "corpus-flacogg").glob("ogg-*"))


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_fuzz_corpus_replays(path: pathlib.Path) -> None:
    fz.test_one_input(path.read_bytes())
