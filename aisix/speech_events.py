"""A speech answer streamed as server-sent events (``stream_format: "sse"``), read as it is relayed:
its audio measured and its reported usage kept, as for an answer of plain audio.

[core] Each ``speech.audio.delta`` event carries a piece of the audio, base64 in ``audio``: it is
decoded and fed to the duration probe of the format the request asked for. ``speech.audio.done``
carries the tokens (``usage``). Held between feeds: one unfinished line, at most ``LINE_LIMIT``
bytes. Nothing is guessed: a piece that is not base64, or a data line that is not a JSON event
(one whose data spans lines), ends the measure (the answer then has no measured duration, its
usage is still read), a longer line ends the reading; the answer is relayed whole either way.
"""

from __future__ import annotations

import binascii
from typing import Any

from .audio import Probe
from .transcript import Usage, line_ends, read_usage, sse_events

LINE_LIMIT = 1024 * 1024  # one event's line: a delta is a few KiB of base64


class SpeechEvents:
    __slots__ = ("_buf", "_measured", "_over", "_probe", "text", "usage")

    def __init__(self, probe: Probe) -> None:
        self._probe = probe
        self._buf = bytearray()
        self._measured = True  # every piece so far was fed to the probe
        self._over = False  # a line too long: nothing more is read
        self.text = ""  # speech has no transcript: output guardrails see nothing here
        self.usage = Usage()

    def feed(self, chunk: bytes | bytearray) -> None:
        if self._over:
            return
        chunk = line_ends(chunk)
        buf = self._buf
        buf += chunk
        if b"\n" in chunk:  # else no line ended: the one held is not searched again (a line fed a
            for event in sse_events(buf):  # byte at a time would cost its length squared)
                if event is None:  # a data line that is no event: it may have held audio, so no guess
                    self._measured = False
                else:
                    self._event(event)
        if len(buf) > LINE_LIMIT:
            self._over, self._measured, self._buf = True, False, bytearray()

    def finish(self) -> None:
        self.feed(b"\n")  # a last event without its line end

    def at_least(self) -> float:
        """The audio's duration so far (an answer cut short): its whole frames; 0.0 when unknown."""
        return self._probe.at_least if self._measured else 0.0

    def seconds(self) -> float | None:
        """The audio's duration, once the answer has been read to its end; None when unknown."""
        return self._probe.end() if self._measured else None

    def _event(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        if isinstance(audio, str) and self._measured and event.get("type") == "speech.audio.delta":
            try:
                self._probe.feed(binascii.a2b_base64(audio, strict_mode=True))
            except (binascii.Error, ValueError):  # not base64 (or not ASCII): the length cannot be told
                self._measured = False
        read_usage(event, self.usage)
