"""Which probe reads this audio: chosen from the file's first bytes (its magic), or for a speech
answer from its Content-Type where the bytes carry no header (pcm).

[core] Sans-IO, like the probes (audio.py): ``Detect`` is itself a probe that keeps the first
``HEAD`` bytes until it can tell the format, then hands them and everything after to that
format's probe. A format no probe claims is ``Unknown``: its duration stays absent.
"""

from __future__ import annotations

from collections.abc import Callable

from . import audio_flac, audio_ogg
from .audio import Chunk, Pcm, Probe, Unknown

HEAD = 64  # bytes a sniff is given (fewer only when the whole file is shorter)

# (sniff, probe factory) per format, in the order they are asked; the first that claims the head wins.
FORMATS: tuple[tuple[Callable[[bytes], bool], Callable[[], Probe]], ...] = (
    (audio_flac.sniff, audio_flac.Flac),
    (audio_ogg.sniff, audio_ogg.Ogg),
)


class Detect:
    __slots__ = ("_head", "_probe")

    def __init__(self) -> None:
        self._head = bytearray()
        self._probe: Probe | None = None

    @property
    def declared(self) -> float | None:
        return None if self._probe is None else self._probe.declared

    @property
    def at_least(self) -> float:
        return 0.0 if self._probe is None else self._probe.at_least

    def feed(self, data: Chunk) -> None:
        if self._probe is not None:
            self._probe.feed(data)
            return
        before = bytes(self._head)  # what earlier feeds gave, all kept (fewer than HEAD bytes)
        self._head += data[:HEAD - len(self._head)]
        if len(self._head) >= HEAD:
            probe = self._choose()
            if before:
                probe.feed(before)
            probe.feed(data)  # whole: the head held a copy of its start

    def end(self) -> float | None:
        probe = self._probe
        if probe is None:  # a file shorter than HEAD
            head = bytes(self._head)
            probe = self._choose()
            probe.feed(head)
        return probe.end()

    def _choose(self) -> Probe:
        head = bytes(self._head)
        probe: Probe = next((factory() for sniff, factory in FORMATS if sniff(head)), Unknown())
        self._probe = probe
        self._head = bytearray()
        return probe


def for_answer(content_type: str) -> Probe:
    """The probe for a speech answer of this Content-Type."""
    media = content_type.partition(";")[0].strip().lower()
    if media in ("audio/pcm", "audio/l16"):
        return Pcm()
    return Detect()
