"""How long is this audio? Told from its bytes as they stream past, never from a buffered file.

[core] Sans-IO: a probe is fed the bytes of one file in order, in chunks of any size (the very
chunks the multipart rewriter or the relay sees), and never does I/O or keeps the file. Every
probe holds a bounded state (at most ``STATE_LIMIT`` bytes, whatever it is fed) and spends time in
proportion to what it is fed, whatever a hostile header claims: a header that lies, loops or ends
early makes the probe give up (its answer is then None), never raise, grow or spin.

A probe answers three questions:

- ``declared``: the duration a header states, as soon as that header has gone past (WAV's data
  size, FLAC's STREAMINFO, an MP3 Xing/VBRI frame count, WebM's Duration, MP4's ``mvhd`` when
  ``moov`` comes first). It decides an early refusal before the rest of the file is sent on.
- ``at_least``: seconds of audio known to be in the file so far (frames, granules, blocks seen);
  a file found too long while streaming is ended before its last byte goes out.
- ``end()``: the file is complete: its duration, or None when the format could not tell.

The formats (one module each): audio_riff (WAV), audio_mpeg (MP3, AAC in ADTS), audio_flac,
audio_ogg (Opus, Vorbis), audio_mkv (WebM, Matroska), audio_mp4 (MP4, M4A). ``detect`` picks one
from the first bytes; ``Pcm`` is the headerless 24 kHz 16-bit mono of a speech ``pcm`` answer.
"""

from __future__ import annotations

from typing import Protocol

STATE_LIMIT = 64 * 1024  # the most any probe keeps between two feeds
Chunk = bytes | bytearray | memoryview


class Probe(Protocol):
    @property
    def declared(self) -> float | None:
        """Seconds a header stated, once read; None before that or when there is none."""
        ...

    @property
    def at_least(self) -> float:
        """Seconds of audio seen so far (0.0 when the format cannot say before its end)."""
        ...

    def feed(self, data: Chunk) -> None:
        """The next bytes of the file. Never raises; a probe that gave up ignores the rest."""
        ...

    def end(self) -> float | None:
        """The whole file has been fed: its duration in seconds, or None."""
        ...


def known_seconds(probe: Probe) -> float:
    """A file's length as far as it is known: what its header states, else at least what has
    passed (what the early refusals hold an upload to)."""
    declared = probe.declared
    return declared if declared is not None else probe.at_least


class Pcm:
    """Raw samples with no header: OpenAI's speech ``pcm`` is 24 kHz, 16-bit, mono."""

    __slots__ = ("_bytes", "_rate")

    declared = None

    def __init__(self, rate: int = 24000, channels: int = 1, sample_bytes: int = 2) -> None:
        self._rate = rate * channels * sample_bytes
        self._bytes = 0

    @property
    def at_least(self) -> float:
        return self._bytes / self._rate

    def feed(self, data: Chunk) -> None:
        self._bytes += len(data)

    def end(self) -> float | None:
        return self._bytes / self._rate


class Unknown:
    """A format the gateway cannot read: nothing is guessed."""

    __slots__ = ()

    declared = None
    at_least = 0.0

    def feed(self, data: Chunk) -> None:
        pass

    def end(self) -> float | None:
        return None


class ItemWalker:
    """The feeding half of a probe that walks a file's items (EBML elements, ISO boxes): the
    subclass's ``_parse(d, i, n)`` consumes whole items of ``d[i:n]`` and returns where the first
    incomplete one starts (-1: it gave up); what a feed boundary cut is kept in ``_buf`` (under
    ``_ITEM`` bytes, the most one item needs) and finished with the next chunk's first bytes."""

    __slots__ = ()
    _ITEM = 16
    _buf: bytearray
    _dead: bool

    def _parse(self, d: bytes | memoryview, i: int, n: int) -> int:
        raise NotImplementedError

    def feed(self, data: Chunk) -> None:
        if self._dead:
            return
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        n = len(view)
        i = 0
        if self._buf:
            # Finish the cut item from the held bytes and the first bytes of this chunk, then go
            # on in the chunk itself at the first byte the window did not use.
            held = len(self._buf)
            window = bytes(self._buf) + bytes(view[:self._ITEM])
            self._buf.clear()
            j = self._parse(window, 0, len(window))
            if j < 0:
                return
            if j < held or (j < len(window) and n <= self._ITEM):
                self._buf += window[j:]
                return
            i = j - held
        i = self._parse(view, i, n)
        if 0 <= i < n:
            self._buf += view[i:]
