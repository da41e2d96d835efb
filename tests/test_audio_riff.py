"""The WAV probe (aisix/audio_riff.py) against ffprobe, on ffmpeg-made files cut every way."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from aisix.audio import STATE_LIMIT
from aisix.audio_riff import Wav, sniff
from tests.audio_files import close_enough, every_split_point, ffprobe_seconds, make, splits

CASES = [
    ("wav", 0.5, 44100, 2), ("wav", 3, 16000, 1), ("wav", 3, 22050, 2), ("wav", 3, 48000, 1),
    ("wav", 61, 16000, 2), ("wav-24k-mono", 0.5, 44100, 2), ("wav-24k-mono", 3, 24000, 1),
    ("wav-24k-mono", 61, 24000, 1),
]


def case_id(case: tuple[str, float, int, int]) -> str:
    return "-".join(map(str, case))


def feed_checked(pieces: list[bytes]) -> tuple[Wav, float | None]:
    """Feed the pieces, checking the contract after each feed: bounded state, at_least never
    decreasing, declared never changing once set."""
    probe = Wav()
    last, declared = 0.0, None
    for piece in pieces:
        probe.feed(memoryview(piece))
        assert probe.state_size() <= STATE_LIMIT
        assert probe.at_least >= last
        last = probe.at_least
        if declared is not None:
            assert probe.declared == declared
        declared = probe.declared
    answer = probe.end()
    assert answer is None or probe.at_least == answer
    return probe, answer


def ffmpeg(path: Path, *args: str, seconds: float = 2, rate: int = 24000) -> Path:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency=440:sample_rate={rate}:duration={seconds}", *args, str(path)],
                   check=True, timeout=60)
    return path


def data_chunk_at(data: bytes) -> int:
    """Where the data chunk's 8-byte header starts (a plain walk of the chunks, for the tests)."""
    at = 12
    while data[at:at + 4] != b"data":
        at += 8 + int.from_bytes(data[at + 4:at + 8], "little") + (data[at + 4] & 1)
    return at


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_the_duration_is_ffprobes_however_the_file_is_cut(case: tuple[str, float, int, int]) -> None:
    path = make(*case)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    cuts = list(splits(data, seed=len(data), count=8))
    # The minute-long files skip the 1-7 byte pieces (millions of feeds); the short ones have them.
    for pieces in cuts if case[1] <= 3 else cuts[:-1]:
        probe, seconds = feed_checked(pieces)
        assert close_enough(seconds, truth), (seconds, truth)
        assert probe.declared == seconds


@pytest.mark.parametrize("case", [case for case in CASES if case[1] <= 3], ids=case_id)
def test_every_split_point_among_the_headers_gives_the_same_answers(case: tuple[str, float, int, int]) -> None:
    data = make(*case).read_bytes()
    whole, seconds = feed_checked([data])
    for pieces in every_split_point(data):
        probe, answer = feed_checked(pieces)
        assert (answer, probe.declared) == (seconds, whole.declared), len(pieces[0])


@pytest.mark.parametrize("case", [("wav", 3, 44100, 2), ("wav-24k-mono", 3, 24000, 1)], ids=case_id)
def test_the_data_size_declares_the_duration_as_soon_as_its_header_is_in(case: tuple[str, float, int, int]) -> None:
    data = make(*case).read_bytes()
    header_end = data_chunk_at(data) + 8
    assert header_end > 44  # ffmpeg writes a LIST chunk before data: it is skipped
    probe = Wav()
    for at in range(header_end + 100):
        probe.feed(data[at:at + 1])
        assert (probe.declared is not None) == (at + 1 >= header_end), at
    assert probe.declared == 3.0


def test_a_streamed_wav_with_unknown_sizes_counts_what_arrives(tmp_path: Path) -> None:
    # ffmpeg writing to a pipe states 0xFFFFFFFF for both sizes, as streamed speech answers do.
    piped = subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                            "sine=frequency=440:sample_rate=24000:duration=2.5", "-c:a", "pcm_s16le", "-f", "wav",
                            "-"], check=True, capture_output=True, timeout=60).stdout
    at = data_chunk_at(piped)
    assert piped[at + 4:at + 8] == b"\xff\xff\xff\xff"
    zero = piped[:at + 4] + bytes(4) + piped[at + 8:]  # the other placeholder encoders write
    for data in (piped, zero):
        path = tmp_path / "streamed.wav"
        path.write_bytes(data)
        truth = ffprobe_seconds(path)
        for pieces in splits(data, count=6):
            probe, seconds = feed_checked(pieces)
            assert probe.declared is None
            assert seconds == 2.5 and close_enough(seconds, truth)
        half = Wav()
        half.feed(data[:len(data) // 2])
        assert 1.2 < half.at_least < 1.3


@pytest.mark.parametrize("args", [
    ["-c:a", "pcm_s24le", "-ac", "3"],       # WAVE_FORMAT_EXTENSIBLE (more than two channels)
    ["-c:a", "pcm_s32le"],
    ["-c:a", "pcm_f32le"],
    ["-c:a", "pcm_f64le", "-ac", "2"],
    ["-c:a", "pcm_alaw"],
    ["-c:a", "pcm_mulaw"],
    ["-c:a", "pcm_u8"],
    ["-c:a", "pcm_s16le", "-rf64", "always"],  # RF64: the data size is in ds64
], ids=lambda args: "-".join(a.strip("-") for a in args))
def test_sample_formats_and_containers(args: list[str], tmp_path: Path) -> None:
    path = ffmpeg(tmp_path / "tone.wav", *args, seconds=1.5)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    for pieces in splits(data, count=4):
        probe, seconds = feed_checked(pieces)
        assert close_enough(seconds, truth) and seconds == 1.5
        assert probe.declared == 1.5


def test_odd_sized_chunks_are_padded(tmp_path: Path) -> None:
    # 8-bit mono with an odd sample count: the data chunk is odd too; an odd chunk before it.
    data = ffmpeg(tmp_path / "odd.wav", "-c:a", "pcm_u8", seconds=1.0001, rate=8000).read_bytes()
    at = data_chunk_at(data)
    assert int.from_bytes(data[at + 4:at + 8], "little") % 2 == 1
    junk = b"junk" + (3).to_bytes(4, "little") + b"abc" + b"\x00"
    path = tmp_path / "padded.wav"
    path.write_bytes(data[:12] + junk + data[12:] + b"\x00" + b"LIST" + (4).to_bytes(4, "little") + b"INFO")
    truth = ffprobe_seconds(path)
    for pieces in splits(path.read_bytes(), count=4):
        probe, seconds = feed_checked(pieces)
        assert seconds == probe.declared == 8001 / 8000 and close_enough(seconds, truth)


def test_a_compressed_wav_answers_none_rather_than_a_guess(tmp_path: Path) -> None:
    data = ffmpeg(tmp_path / "adpcm.wav", "-c:a", "adpcm_ms").read_bytes()
    probe, seconds = feed_checked([data])
    assert (probe.declared, seconds) == (None, None)


def test_a_truncated_wav_answers_what_arrived(tmp_path: Path) -> None:
    data = make("wav-24k-mono", 3, 24000, 1).read_bytes()
    path = tmp_path / "cut.wav"
    for cut in [0, 1, 11, 12, 40, 44, 100, 101, 4096, len(data) // 3, len(data) - 1]:
        probe, seconds = feed_checked([data[:cut]])
        if cut < data_chunk_at(data) + 8:
            assert seconds is None
            continue
        path.write_bytes(data[:cut])
        assert probe.declared == 3.0  # what the header said
        assert seconds is not None and close_enough(seconds, ffprobe_seconds(path))


def test_any_buffer_is_taken_and_none_is_kept() -> None:
    data = make("wav", 0.5).read_bytes()
    probe = Wav()
    for at in range(0, len(data), 7):
        piece = data[at:at + 7]
        spread = bytearray(2 * len(piece))
        spread[::2] = piece
        probe.feed(memoryview(spread)[::2])  # a view that is not contiguous
        spread[:] = bytes(len(spread))  # the caller reuses its buffer
    assert probe.end() == probe.declared == 0.5


def test_sniff() -> None:
    assert sniff(make("wav", 0.5).read_bytes()[:64])
    assert sniff(b"RF64\xff\xff\xff\xffWAVEds64")
    for head in [b"", b"RIFF", b"RIFF\x00\x00\x00\x00AVI ", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"ID3\x04",
                 b"\xff\xfb\x90\x64", b"fLaC", b"OggS"]:
        assert not sniff(head), head


def riff(*chunks: bytes, form: bytes = b"RIFF") -> bytes:
    return form + b"\xff\xff\xff\xff" + b"WAVE" + b"".join(chunks)


def chunk(kind: bytes, body: bytes, size: int | None = None) -> bytes:
    return kind + (len(body) if size is None else size).to_bytes(4, "little") + body


FMT = chunk(b"fmt ", bytes.fromhex("0100 0100 c05d0000 80bb0000 0200 1000"))  # 24 kHz 16-bit mono
ABSURD = {
    "fmt-after-data": riff(chunk(b"data", bytes(480)), FMT),
    "fmt-too-short": riff(chunk(b"fmt ", bytes(14)), chunk(b"data", bytes(480))),
    "fmt-size-huge": riff(chunk(b"fmt ", FMT[8:], size=0xFFFFFFF0), chunk(b"data", bytes(480))),
    "no-channels": riff(chunk(b"fmt ", bytes.fromhex("0100 0000 c05d0000 80bb0000 0200 1000")),
                        chunk(b"data", bytes(480))),
    "no-rate": riff(chunk(b"fmt ", bytes.fromhex("0100 0100 00000000 80bb0000 0200 1000")), chunk(b"data", bytes(480))),
    "no-bits": riff(chunk(b"fmt ", bytes.fromhex("0100 0100 c05d0000 80bb0000 0200 0000")), chunk(b"data", bytes(480))),
    "list-size-huge": riff(FMT, chunk(b"LIST", b"INFO", size=0xFFFFFFFF), chunk(b"data", bytes(480))),
    "some-empty-chunks": riff(FMT, chunk(b"junk", b"") * 250, chunk(b"data", bytes(480))),
    "many-empty-chunks": riff(FMT, chunk(b"junk", b"") * 20000, chunk(b"data", bytes(480))),  # Python work
    "ds64-outside-rf64": riff(chunk(b"ds64", bytes(28)), FMT, chunk(b"data", bytes(480))),
    "ds64-too-short": riff(chunk(b"ds64", bytes(8)), FMT, chunk(b"data", bytes(480)), form=b"RF64"),
    "data-size-huge": riff(FMT, chunk(b"data", bytes(480), size=0xFFFFFFFE)),
    "not-wave": b"RIFF\x00\x00\x00\x00AVI " + FMT,
}
EXPECTED = {"ds64-outside-rf64": 0.01, "data-size-huge": 0.01, "some-empty-chunks": 0.01}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", ABSURD, ids=str)
def test_absurd_headers_give_up_or_count_what_is_there(name: str) -> None:
    data = ABSURD[name]
    for pieces in [[data], [data[i:i + 3] for i in range(0, len(data), 3)]]:
        probe, seconds = feed_checked(pieces)
        assert seconds == EXPECTED.get(name), name
        if seconds is None:
            probe.feed(b"\x00" * 100)  # a probe that gave up ignores the rest
            assert probe.end() is None


@pytest.mark.timeout(20)
def test_hostile_mutations_of_the_header_never_raise_or_grow() -> None:
    data = make("wav", 0.5).read_bytes()[:2048]  # the headers and some samples: a truncated file
    rng = random.Random(14)
    for _ in range(400):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            mutated[rng.randrange(120)] = rng.choice((0x00, 0x7F, 0xFF, rng.randrange(256)))
        pieces = list(splits(bytes(mutated), seed=rng.randrange(1000), count=1))[rng.randrange(3)]
        _, seconds = feed_checked(pieces)
        assert seconds is None or seconds >= 0
