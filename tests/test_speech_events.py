"""aisix.speech_events, sans-IO: a speech answer of server-sent events, measured as it passes."""

from __future__ import annotations

import base64
import json

import pytest

from aisix.audio_detect import for_format
from aisix.devaudio import silence
from aisix.speech_events import LINE_LIMIT, SpeechEvents

USAGE = {"input_tokens": 5, "output_tokens": 90, "total_tokens": 95}


def answer(audio: bytes, pieces: int = 7, newline: bytes = b"\n") -> bytes:
    step = -(-len(audio) // pieces)
    events = [{"type": "speech.audio.delta", "audio": base64.b64encode(audio[i:i + step]).decode()}
              for i in range(0, len(audio), step)]
    events.append({"type": "speech.audio.done", "usage": USAGE})
    return b"".join(b"data: " + json.dumps(e).encode() + newline + newline for e in events)


def read(body: bytes, fmt: str, cuts: list[int]) -> SpeechEvents:
    reader = SpeechEvents(for_format(fmt))
    at = 0
    for cut in [*cuts, len(body)]:
        reader.feed(body[at:cut])
        at = cut
    reader.finish()
    return reader


@pytest.mark.parametrize("fmt", ["mp3", "wav", "flac", "opus", "aac", "pcm"])
def test_every_format_is_measured_as_its_plain_answer_is(fmt: str) -> None:
    _, audio = silence(fmt, 3.0)
    plain = for_format(fmt)
    plain.feed(audio)
    expected = plain.end()
    assert expected is not None and expected == pytest.approx(3.0, abs=0.06)
    reader = read(answer(audio), fmt, [])
    assert reader.seconds() == pytest.approx(expected)
    assert (reader.usage.input_tokens, reader.usage.output_tokens) == (5, 90)


def test_any_split_of_the_answer_reads_the_same() -> None:
    _, audio = silence("mp3", 0.5)
    body = answer(audio, pieces=3, newline=b"\r\n")
    whole = read(body, "mp3", []).seconds()
    assert whole is not None and whole > 0
    for cut in range(1, len(body)):
        reader = read(body, "mp3", [cut])
        assert (reader.seconds(), reader.usage.total_tokens) == (whole, 95), cut
    one_by_one = read(body, "mp3", list(range(1, len(body))))
    assert one_by_one.seconds() == whole


def test_a_piece_that_is_not_base64_leaves_the_length_unknown_and_the_usage_read() -> None:
    _, audio = silence("mp3", 1.0)
    body = answer(audio).replace(b'"audio": "', b'"audio": "!', 1)
    reader = read(body, "mp3", [])
    assert reader.seconds() is None
    assert reader.usage.total_tokens == 95


def test_a_line_over_the_limit_ends_the_reading_with_no_guess() -> None:
    reader = SpeechEvents(for_format("mp3"))
    reader.feed(b'data: {"type": "speech.audio.delta", "audio": "' + b"A" * (LINE_LIMIT + 10))
    assert len(reader._buf) == 0  # nothing held past the limit
    reader.feed(b'"}\n\ndata: ' + json.dumps({"type": "speech.audio.done", "usage": USAGE}).encode() + b"\n\n")
    reader.finish()
    assert reader.seconds() is None and reader.usage.total_tokens is None


def test_other_events_and_comments_are_passed_over() -> None:
    _, audio = silence("pcm", 1.0)
    body = (b": keep-alive\n\nevent: speech.audio.delta\n" + answer(audio)
            + b'data: {"type": "error", "audio": "AAAA"}\n\ndata: [DONE]\n\n')
    reader = read(body, "pcm", [])
    assert reader.seconds() == pytest.approx(1.0)  # the error event's "audio" is not audio


def test_speech_events_with_cr_line_ends_are_measured_not_zero() -> None:
    """SSE lets a line end with CR alone. SpeechEvents split on LF only: the whole answer was one
    line no JSON parser reads, no delta was fed, and a pcm answer measured 0.0 seconds (priced at
    nothing per minute, nothing taken from an audio quota): a guess, not a measure."""
    _, audio = silence("pcm", 1.0)
    reader = read(answer(audio, newline=b"\r"), "pcm", [])
    assert reader.seconds() == pytest.approx(1.0)
    assert reader.usage.total_tokens == 95
    cut = read(answer(audio, newline=b"\r\n"), "pcm", [len(answer(audio, newline=b"\r\n")) // 2])
    assert cut.seconds() == pytest.approx(1.0)


def test_a_speech_event_whose_data_spans_lines_leaves_the_duration_absent_not_short() -> None:
    """An event's data may come in several `data:` lines (SSE joins them). Each line alone is not
    JSON and was passed over in silence: the audio of that delta was left out and the answer
    measured shorter than it is, a guess the docs rule out ("never guessed")."""
    _, audio = silence("pcm", 1.0)
    half = len(audio) // 2
    first = json.dumps({"type": "speech.audio.delta", "audio": base64.b64encode(audio[:half]).decode()})
    second = {"type": "speech.audio.delta", "audio": base64.b64encode(audio[half:]).decode()}
    body = (b"data: " + first.encode() + b"\n\n"
            + b'data: {"type": "speech.audio.delta",\ndata: "audio": "' + second["audio"].encode() + b'"}\n\n')
    seconds = read(body, "pcm", []).seconds()
    assert seconds is None or abs(seconds - 1.0) < 0.01, seconds
