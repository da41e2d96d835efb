"""OGG (Opus, Vorbis, FLAC, Speex): the last granule position of each audio stream.

[core] Sans-IO, a probe as aisix/audio.py describes: it keeps at most one page header and its
segment table (282 bytes), the first bytes of a stream's first packet and, per audio stream (16
at most), three numbers.

An OGG file is pages: ``OggS``, version 0, flags (continued, first page of a stream, last page),
the granule position, the stream serial, sequence and CRC, then a segment table whose sum is the
page body's size. The body is skipped by that count, never looked at, except for a stream's
first page: its first packet names the codec. Opus (``OpusHead``) counts granules at 48 kHz and
its first ``pre-skip`` samples are not played; Vorbis (``\\x01vorbis``), FLAC (``\\x7fFLAC``) and
Speex (``Speex``) count them at the sample rate their header gives. A stream's duration is its
last granule position (less pre-skip) over that rate; ``at_least`` follows the pages seen whole.
Other codecs (Theora video, anything unknown) are ignored: a file with no audio stream this
module knows has no duration (None).

Several streams in one file (all their first pages come before any other page): the longest.
A chained file (a new set of first pages after the last one ended, as ``cat a.ogg b.ogg`` makes):
the links add up. ffprobe reports only the last link's duration there, though ffmpeg plays them
all. A page that does not start where the previous one ended is skipped by finding the next
``OggS`` (``bytes.find``), within a bounded distance and a bounded number of times; the CRC is not
checked (it would cost a pass over every byte).
"""

from __future__ import annotations

from .audio import Chunk

MAGIC = b"OggS"
_PAGE_HEAD = 27  # up to and including the segment count
_IDENTIFY = 64  # bytes of a stream's first packet read to identify it (FLAC needs 30, Speex 40)
_STREAMS = 16  # audio streams followed in one link; more are ignored
_RESYNC_BYTES = 2 * (_PAGE_HEAD + 255 + 255 * 255)  # how far to look for the next page: two of the largest
_BAD_PAGES = 32  # pages out of place before the probe gives up
_NO_GRANULE = -1  # a page on which no packet ends

_HEAD, _SEGMENTS, _FIRST_PACKET, _RESYNC = range(4)

FLAG_CONTINUED, FLAG_FIRST, FLAG_LAST = 1, 2, 4


def sniff(head: bytes) -> bool:
    return head.startswith(MAGIC)


def identify(packet: bytes) -> tuple[int, int] | None:
    """(granule rate, samples to drop) of an audio stream from the start of its first packet, or
    None for a codec not read here."""
    if packet.startswith(b"OpusHead") and len(packet) >= 19 and packet[8] < 16:  # major version 0
        return 48000, int.from_bytes(packet[10:12], "little")
    if packet.startswith(b"\x01vorbis") and len(packet) >= 16:
        rate = int.from_bytes(packet[12:16], "little")
        return (rate, 0) if rate else None
    if packet.startswith(b"\x7fFLAC") and len(packet) >= 30 and packet[9:13] == b"fLaC":
        rate = int.from_bytes(packet[27:30], "big") >> 4  # STREAMINFO's 20-bit sample rate
        return (rate, 0) if rate else None
    if packet.startswith(b"Speex   ") and len(packet) >= 40:
        rate = int.from_bytes(packet[36:40], "little")
        return (rate, 0) if rate else None
    return None


class Ogg:
    __slots__ = ("_bad", "_body", "_buf", "_dead", "_done", "_flags", "_granule", "_in_heads", "_need",
                 "_searched", "_serial", "_skip", "_state", "_streams")

    def __init__(self) -> None:
        self._state = _HEAD
        self._need = _PAGE_HEAD
        self._buf = bytearray()
        self._skip = 0  # body bytes of the current page still to pass over
        self._dead = False
        self._bad = 0  # pages found out of place
        self._searched = 0  # bytes looked through for the next page, this time
        # The current page.
        self._flags = 0
        self._granule = _NO_GRANULE
        self._serial = 0
        self._body = 0
        # serial -> [rate, samples to drop, last granule (-1: none yet)], for the current link.
        self._streams: dict[int, list[int]] = {}
        self._in_heads = True  # only first pages so far in this link
        self._done = 0.0  # seconds of the links before this one

    @property
    def declared(self) -> float | None:
        return None  # OGG has no header stating a duration

    @property
    def at_least(self) -> float:
        return self._done + self._link()

    def held(self) -> int:
        """Bytes kept between feeds (for the tests: never more than STATE_LIMIT)."""
        return len(self._buf)

    def feed(self, data: Chunk) -> None:
        if self._dead:
            return
        view = memoryview(data).cast("B")
        pos, size = 0, len(view)
        while pos < size and not self._dead:
            if self._skip:
                step = min(self._skip, size - pos)
                self._skip -= step
                pos += step
                if not self._skip:
                    self._page_done()
                continue
            if self._state == _RESYNC:
                pos = self._resync(view, pos)
                continue
            piece = view[pos:pos + self._need - len(self._buf)]
            self._buf += piece
            pos += len(piece)
            if len(self._buf) == self._need:
                self._read()

    def end(self) -> float | None:
        if self._dead or (not self._done and all(stream[2] < 0 for stream in self._streams.values())):
            return None  # gave up, or no granule of a known audio stream seen
        return self._done + self._link()

    def _link(self) -> float:
        """Seconds of the current link: its longest stream."""
        return max(((granule - drop) / rate for rate, drop, granule in self._streams.values()
                    if granule > drop), default=0.0)

    def _read(self) -> None:
        buf = self._buf
        if self._state == _HEAD:
            if buf[:4] != MAGIC or buf[4] != 0 or buf[5] & ~7:
                self._lost()
                return
            self._flags = buf[5]
            self._granule = int.from_bytes(buf[6:14], "little", signed=True)
            self._serial = int.from_bytes(buf[14:18], "little")
            if buf[26]:
                self._state, self._need = _SEGMENTS, _PAGE_HEAD + buf[26]
                return
            self._body = 0
        elif self._state == _SEGMENTS:
            self._body = sum(buf[_PAGE_HEAD:])
        else:  # _FIRST_PACKET
            known = identify(bytes(buf))
            if known is not None and len(self._streams) < _STREAMS:
                self._streams.setdefault(self._serial, [*known, _NO_GRANULE])
            self._skip = self._body - len(buf)
            self._restart()
            if not self._skip:
                self._page_done()
            return
        self._page_start()

    def _page_start(self) -> None:
        """A page header and segment table are read: see to its body."""
        self._searched = 0
        first = self._flags & FLAG_FIRST
        if first and not self._in_heads:  # a new link of a chained file
            self._done += self._link()
            self._streams.clear()
            self._in_heads = True
        elif not first:
            self._in_heads = False
        if first and self._body and self._serial not in self._streams:
            self._state, self._need = _FIRST_PACKET, min(self._body, _IDENTIFY)
            self._buf.clear()
            return
        self._restart()
        self._skip = self._body
        if not self._skip:
            self._page_done()

    def _page_done(self) -> None:
        stream = self._streams.get(self._serial)
        if stream is not None and self._granule > stream[2]:
            stream[2] = self._granule

    def _restart(self) -> None:
        self._state, self._need = _HEAD, _PAGE_HEAD
        self._buf.clear()

    def _lost(self) -> None:
        """_buf does not hold a page header: look for the next ``OggS`` from its second byte on."""
        self._bad += 1
        if self._bad > _BAD_PAGES or (not self._streams and not self._done):
            self._dead = True  # out of place too often, or before any stream was known
            return
        self._state, self._searched = _RESYNC, 0
        del self._buf[:1]

    def _resync(self, view: memoryview, pos: int) -> int:
        """Look for ``OggS`` in what _buf kept and the bytes from pos on; return the new pos."""
        kept = len(self._buf)
        window = bytes(self._buf) + view[pos:pos + _RESYNC_BYTES - self._searched]
        at = window.find(MAGIC)
        if at < 0:
            self._searched += len(window) - kept
            if self._searched >= _RESYNC_BYTES:
                self._dead = True
            self._buf[:] = window[-3:]  # the start of an OggS cut by the chunk's end
            return pos + len(window) - kept
        self._state, self._need = _HEAD, _PAGE_HEAD
        if at + len(MAGIC) <= kept:  # in what was kept: fewer bytes than a page header
            self._buf[:] = window[at:kept]
            return pos
        self._buf[:] = MAGIC
        return pos + at + len(MAGIC) - kept
