"""Which probe reads this audio: chosen from the file's first bytes (its magic), or for a speech
answer from its Content-Type where the bytes carry no header (pcm).

[core] Sans-IO, like the probes (audio.py): ``Detect`` is itself a probe that keeps the first
``HEAD`` bytes until it can tell the format, then hands them and everything after to that
format's probe. A format no probe claims is ``Unknown``: its duration stays absent.
"""

from __future__ import annotations

from collections.abc import Callable

from . import audio_flac, audio_mkv, audio_mp4, audio_mpeg, audio_ogg, audio_riff
from .audio import Chunk, Pcm, Probe, Unknown

HEAD = 64  # bytes a sniff is given (fewer only when the whole file is shorter)

# (sniff, probe factory) per format, in the order they are asked; the first that claims the head wins.
FORMATS: tuple[tuple[Callable[[bytes], bool], Callable[[], Probe]], ...] = (
    (audio_riff.sniff, audio_riff.Wav),
    (audio_flac.sniff, audio_flac.Flac),
    (audio_ogg.sniff, audio_ogg.Ogg),
    (audio_mkv.sniff, audio_mkv.MatroskaProbe),
    (audio_mp4.sniff, audio_mp4.Mp4Probe),
    (audio_mpeg.sniff, audio_mpeg.Mpeg),  # last: its sniff is the loosest (a frame sync, or ID3)
)


# A speech answer's Content-Type names its format: that format's sniff is asked first (it still
# has to claim the bytes; a mislabelled answer falls through to the usual order).
_BY_MEDIA: dict[str, tuple[Callable[[bytes], bool], Callable[[], Probe]]] = {
    "audio/mpeg": FORMATS[5], "audio/mp3": FORMATS[5], "audio/aac": FORMATS[5],
    "audio/wav": FORMATS[0], "audio/x-wav": FORMATS[0], "audio/wave": FORMATS[0],
    "audio/flac": FORMATS[1], "audio/ogg": FORMATS[2], "audio/opus": FORMATS[2],
}


class Detect:
    __slots__ = ("_first", "_head", "_probe")

    def __init__(self, first: tuple[Callable[[bytes], bool], Callable[[], Probe]] | None = None) -> None:
        self._head = bytearray()
        self._probe: Probe | None = None
        self._first = first  # the format to try before the others

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
        if not self._head and len(data) >= HEAD:  # the usual first chunk: the head is in it
            self._choose(bytes(data[:HEAD])).feed(data)
            return
        before = bytes(self._head)  # what earlier feeds gave, all kept (fewer than HEAD bytes)
        self._head += data[:HEAD - len(self._head)]
        if len(self._head) >= HEAD:
            probe = self._choose(bytes(self._head))
            if before:
                probe.feed(before)
            probe.feed(data)  # whole: the head held a copy of its start

    def end(self) -> float | None:
        probe = self._probe
        if probe is None:  # a file shorter than HEAD
            head = bytes(self._head)
            probe = self._choose(head)
            probe.feed(head)
        return probe.end()

    def _choose(self, head: bytes) -> Probe:
        first = self._first
        if first is not None and first[0](head):
            probe = first[1]()
        else:
            probe = next((factory() for sniff, factory in FORMATS if sniff(head)), Unknown())
        self._probe = probe
        self._head = bytearray()
        return probe


_MEDIA_OF_FORMAT = {"mp3": "audio/mpeg", "wav": "audio/wav", "flac": "audio/flac", "opus": "audio/ogg",
                    "aac": "audio/aac", "pcm": "audio/pcm"}


def for_format(response_format: str) -> Probe:
    """The probe for speech audio in this ``response_format`` (an answer of events says no
    Content-Type for it)."""
    return for_answer(_MEDIA_OF_FORMAT.get(response_format.lower(), ""))


def for_answer(content_type: str) -> Probe:
    """The probe for a speech answer of this Content-Type."""
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if media in ("audio/pcm", "audio/l16"):
        return _raw(params)
    return Detect(_BY_MEDIA.get(media))


def _raw(params: str) -> Probe:
    """Raw 16-bit samples: at the ``rate`` and ``channels`` the label states (RFC 2586; raw audio
    has no header to say otherwise), else OpenAI's 24 kHz mono. A stated value that is no count
    leaves the duration unknown, never guessed."""
    stated = {}
    for param in params.split(";"):
        name, _, value = param.partition("=")
        stated[name.strip().lower()] = value.strip().strip('"')
    rate, channels = stated.get("rate", "24000"), stated.get("channels", "1")
    if not all(v.isascii() and v.isdigit() and len(v) <= 7 for v in (rate, channels)):
        return Unknown()
    if not (0 < int(rate) <= 1_000_000 and 0 < int(channels) <= 255):
        return Unknown()
    return Pcm(int(rate), int(channels))
