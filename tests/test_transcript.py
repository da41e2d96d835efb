"""Reading a transcription answer's text and usage, fed in any chunking."""

from __future__ import annotations

import json

import pytest

from aisix.transcript import TranscriptReader, Usage

SSE = b"".join(
    b"data: " + json.dumps(e).encode() + b"\n\n" for e in [
        {"type": "transcript.text.delta", "delta": "hello "},
        {"type": "transcript.text.delta", "delta": "world"},
        {"type": "transcript.text.done", "text": "hello world",
         "usage": {"type": "tokens", "input_tokens": 7, "output_tokens": 3, "total_tokens": 10}},
    ])

CASES = [
    ("application/json", json.dumps({"text": "hi", "usage": {"input_tokens": 5, "output_tokens": 2,
                                                               "total_tokens": 7}}).encode(),
     "hi", Usage(5, 2, 7, None)),
    ("application/json", json.dumps({"text": "a", "duration": 3.5, "segments": [{"text": "s1"}, {"text": "s2"}],
                                     "usage": {"type": "duration", "seconds": 4}}).encode(),
     "a\ns1\ns2", Usage(None, None, None, 4.0)),
    ("application/json", json.dumps({"text": "a", "duration": 3.5}).encode(), "a", Usage(None, None, None, 3.5)),
    ("application/json", b"not json", "", Usage()),
    ("text/plain; charset=utf-8", b"1\n00:00:00,000 --> 00:00:01,000\nhello\n", "1\n00:00:00,000 --> 00:00:01,000\nhello\n", Usage()),
    ("text/event-stream", SSE, "hello world", Usage(7, 3, 10, None)),
    ("text/event-stream", SSE.replace(b"\n", b"\r\n"), "hello world", Usage(7, 3, 10, None)),
]


@pytest.mark.parametrize("ctype, body, text, usage", CASES)
def test_any_chunking_reads_the_same(ctype: str, body: bytes, text: str, usage: Usage) -> None:
    for size in (1, 3, 17, len(body) or 1):
        reader = TranscriptReader(ctype)
        for i in range(0, len(body), size):
            reader.feed(body[i:i + size])
        reader.finish()
        assert (reader.text, reader.usage) == (text, usage), size


def test_over_the_cap_nothing_is_guessed() -> None:
    reader = TranscriptReader("application/json", limit=100)
    reader.feed(json.dumps({"text": "x" * 200, "usage": {"total_tokens": 9}}).encode())
    reader.finish()
    assert reader.usage.tokens is None and reader.text == ""


def test_tokens_total() -> None:
    assert Usage(2, 3, None).tokens == 5 and Usage(None, None, 9).tokens == 9 and Usage().tokens is None


def test_a_long_event_stream_keeps_its_usage() -> None:
    # The reader bounds what it keeps (one line, and the text), not what passes: the usage is in
    # the last event, after every delta.
    deltas = b"".join(b'data: {"type":"transcript.text.delta","delta":"w%d "}\n\n' % i for i in range(40_000))
    done = json.dumps({"type": "transcript.text.done", "text": "...",
                       "usage": {"type": "tokens", "input_tokens": 900, "output_tokens": 40_000,
                                 "total_tokens": 40_900}}).encode()
    body = deltas + b"data: " + done + b"\n\n"
    assert len(body) > 1024 * 1024
    reader = TranscriptReader("text/event-stream", 1024 * 1024)
    for i in range(0, len(body), 16 * 1024):
        reader.feed(body[i:i + 16 * 1024])
    reader.finish()
    assert reader.usage == Usage(900, 40_000, 40_900, None)
