"""audio_detect: the first bytes choose the probe, whatever the chunking; unknown formats stay
unknown; a speech pcm answer is timed by its length."""

from __future__ import annotations

import pytest

from aisix.audio import Pcm, Unknown
from aisix.audio_detect import FORMATS, HEAD, Detect, for_answer
from tests.audio_files import FORMATS as MADE
from tests.audio_files import close_enough, ffprobe_seconds, make, run, splits

KNOWN = [f for f in MADE if any(sniff(make(f, 1.0).read_bytes()[:HEAD]) for sniff, _ in FORMATS)]


def test_every_probe_module_is_wired_in() -> None:
    assert len(FORMATS) >= 2 and KNOWN  # grows as the formats land; each one below is exercised


@pytest.mark.parametrize("fmt", KNOWN)
def test_detect_times_each_known_format_at_any_split(fmt: str) -> None:
    path = make(fmt, 2.5)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    for pieces in splits(data, seed=3, count=6):
        _, seconds = run(Detect, pieces)
        assert close_enough(seconds, truth), (fmt, seconds, truth)


@pytest.mark.parametrize("data", [b"", b"RIF", b"\x00" * 10, b"hello world, not audio" * 100])
def test_what_no_probe_claims_has_no_duration(data: bytes) -> None:
    probe = Detect()
    probe.feed(data)
    assert probe.end() is None and probe.declared is None and probe.at_least == 0.0


def test_speech_answers_by_content_type() -> None:
    pcm = for_answer("audio/pcm")
    assert isinstance(pcm, Pcm)
    pcm.feed(b"\x00" * 48000)
    assert pcm.end() == 1.0  # 24 kHz, 16-bit, mono: 48,000 bytes a second
    assert isinstance(for_answer("audio/mpeg"), Detect)
    assert isinstance(Unknown().end(), type(None))


@pytest.mark.parametrize(("label", "fmt"), [("audio/mpeg", "mp3-cbr"), ("audio/wav", "wav"), ("audio/flac", "flac"),
                                             ("audio/mpeg", "wav"), ("audio/wav", "mp3-cbr"),
                                             ("audio/flac", "mp3-id3"), ("audio/opus", "flac")])
def test_an_answers_content_type_is_tried_first_but_the_bytes_decide(label: str, fmt: str) -> None:
    """The labelled format's sniff goes first (cheaper for the usual answer); a mislabelled
    answer is still timed by the format its bytes are, at any split."""
    path = make(fmt, 2.5)
    data, truth = path.read_bytes(), ffprobe_seconds(path)
    for pieces in splits(data, seed=5, count=4):
        _, seconds = run(lambda: for_answer(label), pieces)
        assert close_enough(seconds, truth), (label, fmt, seconds, truth)
