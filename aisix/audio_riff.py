"""WAV duration from its RIFF chunks as they stream past: the ``fmt `` chunk and the data size.

[core] Sans-IO (see aisix/audio.py): it keeps at most one chunk header or the first 40 bytes of
``fmt `` between feeds, and the samples themselves are only counted, never looked at.

The duration is the number of whole sample frames in ``data`` over the sample rate, a frame being
``channels * ceil(bits / 8)`` bytes, as ffmpeg reads it. Chunks before ``data`` (``LIST``,
``fact``, ``bext``, ...) are skipped with their odd-size pad byte; anything after ``data`` is
ignored. A data size of 0 or 0xFFFFFFFF is what streaming encoders write when they do not know the
length yet (ffmpeg to a pipe, OpenAI's streamed speech ``wav``): the probe then counts the bytes
actually fed, and declares nothing. A data size larger than what arrives (a truncated file) also
ends at the bytes fed. RF64 is read through its ``ds64`` chunk. More than 256 chunks before
``data`` (a file built to cost Python work every 8 bytes) make the probe give up.

Only sample formats whose duration follows from the byte count are read: PCM, IEEE float, A-law,
mu-law (plain or in WAVE_FORMAT_EXTENSIBLE). A compressed WAV (ADPCM, MP3 in WAV, ...) answers
None rather than a guess from its stated byte rate.
"""

from __future__ import annotations

import struct

from .audio import Chunk

_PCM, _FLOAT, _ALAW, _MULAW, _EXTENSIBLE = 1, 3, 6, 7, 0xFFFE
_READABLE = frozenset({_PCM, _FLOAT, _ALAW, _MULAW})
_UNKNOWN_SIZES = frozenset({0, 0xFFFFFFFF})
_FMT_KEPT = 40  # the extensible fmt: 16 bytes, cbSize, 22 bytes of extension; the GUID ends at 40
_DS64_KEPT = 28  # riff size, data size, sample count (8 bytes each), table length
# Chunks before data: real files have a handful. A file of empty chunks would cost Python work
# every 8 bytes; past this many the probe gives up.
_MAX_CHUNKS = 256

# What the bytes being collected are.
_RIFF, _CHUNK, _FMT, _DS64, _DATA, _AFTER, _DEAD = range(7)


def sniff(head: bytes) -> bool:
    """A RIFF (or RF64) container holding WAVE."""
    return len(head) >= 12 and head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE"


class Wav:
    """Probe for a WAV file (aisix.audio.Probe)."""

    __slots__ = ("_state", "_buf", "_need", "_skip", "_frame", "_rate", "_left", "_data", "_declared",
                 "_rf64", "_ds64_size", "_chunks")

    def __init__(self) -> None:
        self._state = _RIFF
        self._buf = bytearray()   # the header being collected, at most _need (<= 40) bytes
        self._need = 12
        self._skip = 0            # bytes of the current chunk still to pass over
        self._frame = 0           # bytes per sample frame, once fmt is read
        self._rate = 0
        self._left: int | None = None  # data bytes still expected; None: to the end of the file
        self._data = 0            # data bytes seen
        self._declared: float | None = None
        self._rf64 = False
        self._ds64_size: int | None = None
        self._chunks = 0

    @property
    def declared(self) -> float | None:
        return self._declared

    @property
    def at_least(self) -> float:
        return self._seconds() or 0.0

    def state_size(self) -> int:
        """Bytes held between feeds (for the tests' bound)."""
        return len(self._buf)

    def end(self) -> float | None:
        if self._state not in (_DATA, _AFTER):
            return None
        return self._seconds()

    def _seconds(self) -> float | None:
        if not self._frame:
            return None
        return (self._data // self._frame) / self._rate

    def feed(self, data: Chunk) -> None:
        state = self._state
        if state >= _AFTER:
            return
        view = memoryview(data)
        view = (view if view.c_contiguous else memoryview(view.tobytes())).cast("B")
        n = len(view)
        if state == _DATA:  # the hot path: samples are only counted
            return self._count(n)
        at = 0
        while at < n and self._state < _DATA:
            if self._skip:
                step = min(self._skip, n - at)
                self._skip -= step
                at += step
                continue
            step = min(self._need - len(self._buf), n - at)
            self._buf += view[at:at + step]
            at += step
            if len(self._buf) == self._need:
                header = bytes(self._buf)
                self._buf.clear()
                self._header(header)
        if self._state == _DATA and at < n:
            self._count(n - at)

    def _count(self, n: int) -> None:
        if self._left is None:
            self._data += n
        elif n < self._left:
            self._data += n
            self._left -= n
        else:
            self._data += self._left
            self._left = 0
            self._state = _AFTER

    def _give_up(self) -> None:
        self._state = _DEAD
        self._buf.clear()

    def _header(self, header: bytes) -> None:
        state = self._state
        if state == _RIFF:
            if not sniff(header):
                return self._give_up()
            self._rf64 = header[:4] == b"RF64"
            self._state, self._need = _CHUNK, 8
        elif state == _CHUNK:
            self._chunk(header[:4], int.from_bytes(header[4:8], "little"))
        elif state == _FMT:
            self._fmt(header)
        elif state == _DS64:
            self._ds64_size = int.from_bytes(header[8:16], "little")
            self._state, self._need = _CHUNK, 8

    def _chunk(self, kind: bytes, size: int) -> None:
        self._chunks += 1
        if self._chunks > _MAX_CHUNKS:
            return self._give_up()
        pad = size & 1
        if kind == b"fmt ":
            if size < 16:
                return self._give_up()
            self._need = min(size, _FMT_KEPT)
            self._skip = size - self._need + pad
            self._state = _FMT
        elif kind == b"ds64" and self._rf64:
            if size < _DS64_KEPT:
                return self._give_up()
            self._need, self._skip, self._state = _DS64_KEPT, size - _DS64_KEPT + pad, _DS64
        elif kind == b"data":
            if not self._frame:  # data before fmt: nothing says what a sample is
                return self._give_up()
            if self._rf64 and size == 0xFFFFFFFF and self._ds64_size is not None:
                size = self._ds64_size
            if size in _UNKNOWN_SIZES:
                self._left = None
            else:
                self._left = size
                self._declared = (size // self._frame) / self._rate
            self._state = _DATA
        else:
            self._skip = size + pad

    def _fmt(self, fmt: bytes) -> None:
        tag, channels, rate, _byte_rate, _align, bits = struct.unpack_from("<HHIIHH", fmt)
        if tag == _EXTENSIBLE and len(fmt) >= 26:
            tag = int.from_bytes(fmt[24:26], "little")  # the sub-format GUID starts with the tag
        if tag not in _READABLE or not channels or not rate or not 0 < bits <= 64:
            return self._give_up()
        self._frame = channels * ((bits + 7) // 8)
        self._rate = rate
        self._state, self._need = _CHUNK, 8
