"""MP4/M4A duration: the ``moov`` box's ``mvhd``, wherever ``moov`` sits in the file.

[core] Sans-IO and bounded: the probe walks box headers as the bytes go past, enters only ``moov``
and the boxes inside it that lead to a duration (``trak``, ``mdia``, ``mvex``), reads at most 36
bytes of the few boxes it needs (``mvhd``, ``tkhd``, ``mdhd``, ``hdlr``, ``mehd``) and skips
every other payload by its size, ``mdat`` and the sample tables included. Nothing of ``moov`` is
kept, so a long file's large ``moov`` (a 4-byte sample size per AAC frame, 100 KB for ten
minutes) costs no memory: the probe holds one partial item (36 bytes), a stack of four open boxes
and a few numbers.

- ``declared``: once the whole ``moov`` has gone past: ``mvhd``'s duration over its timescale
  (what ffprobe reports). When ``mvhd`` says 0 (or all ones: unknown), the first audio track's
  ``tkhd`` duration (same timescale), else its ``mdhd`` duration over the media timescale. In a
  ``moov`` that comes first (``+faststart``) that is before any audio; in the common M4A it comes
  after ``mdat``, at the end of the file.
- A fragmented file (``moov`` holding ``mvex``: the samples are in ``moof`` fragments, as
  Safari's MediaRecorder and ``ffmpeg -movflags frag_keyframe+empty_moov`` write them):
  ``declared`` only from ``mehd``. The fragments of the first audio track are added up as they
  pass, after a complete ``moov``: each ``traf``'s ``trun`` gives its sample count, and each
  sample's duration comes from the ``trun`` itself (read a chunk at a time when it lists them), else
  from the ``tfhd``'s default, else from the track's ``trex``; the sum is over the ``mdhd``
  timescale, as ffprobe counts them. ``at_least`` is that sum so far, and ``end()`` answers it
  when ``mehd`` does not state the length. A ``trun`` whose samples have no duration from any of
  the three, or a ``moof`` before the ``moov`` or inside another box (decoders disagree on
  those), leaves the length unknown (None).
- Otherwise ``at_least`` is 0.0: knowing how many seconds of ``mdat`` have passed needs the
  sample tables, which may come after it.
- ``end()``: ``declared``, the fragments' sum, or None (no complete ``moov``: a truncated file or
  not an MP4).

Gives up (None) on what no muxer writes: a box smaller than its header, a box running past its
parent, a size 0 ("to the end of the file") anywhere but the top level, an ``mvhd``/``mdhd``
version other than 0 or 1 or too short for its fields, a ``tfhd`` or ``trun`` too short for what
its flags say it holds (its sample table included).
"""

from __future__ import annotations

import array
import sys

from .audio import ItemWalker

_ITEM = 36          # the most one item needs: a 16-byte header, or the first 36 bytes of tkhd v1
_TO_END = 1 << 80   # the skip of a top-level box whose size is 0: it runs to the end of the file

# The boxes entered, by parent (b"" is the top level); any other box is skipped.
_ENTER = {b"": {b"moov", b"moof"}, b"moov": {b"trak", b"mvex"}, b"trak": {b"mdia"}, b"moof": {b"traf"}}
# The boxes read, by parent, and how much of each is needed (v1 layouts are the longest; a trun:
# its flags and sample count, the sample table after them is read apart).
_READ = {b"moov": {b"mvhd": 32}, b"trak": {b"tkhd": 36}, b"mdia": {b"mdhd": 32, b"hdlr": 12},
         b"mvex": {b"mehd": 12, b"trex": 16}, b"traf": {b"tfhd": 24, b"trun": 8}}
_TREX_KEPT = 16  # trex boxes remembered (one per track; a file of more tracks keeps the first)
# A trun's sample table is read as 32-bit numbers (big-endian in the file) a chunk at a time.
_U32 = "I" if array.array("I").itemsize == 4 else "L"
_SWAP = sys.byteorder == "little"
_TOP = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"})


def sniff(head: bytes) -> bool:
    """An ISO BMFF/QuickTime file: a plausible first box of a type that starts such files."""
    if len(head) < 8 or head[4:8] not in _TOP:
        return False
    size = int.from_bytes(head[:4], "big")
    return size in (0, 1) or size >= 8


def _unsigned(value: bytes, at: int, length: int) -> int | None:
    """The big-endian number at value[at:at + length]; None if all ones (QuickTime: unknown)."""
    number = int.from_bytes(value[at:at + length], "big")
    return None if number == (1 << 8 * length) - 1 else number


class Mp4Probe(ItemWalker):
    """How long an MP4/M4A file is, from its bytes in order (see the module docstring)."""

    _ITEM = _ITEM  # the shared feed reads it from the class
    __slots__ = ("_buf", "_pos", "_skip", "_want", "_rest", "_leaf", "_stack", "_dead", "_declared",
                 "_moov_done", "_movie_scale", "_movie_duration", "_fragmented", "_fragments",
                 "_tkhd", "_media", "_handler", "_audio", "_track", "_trex", "_traf", "_traf_default",
                 "_samples", "_entries", "_entry", "_after", "_unknown", "_audio_track")

    def __init__(self) -> None:
        self._buf = bytearray()     # the start of an item cut by a feed boundary (< _ITEM bytes)
        self._pos = 0               # stream offset of the first byte not consumed (the buf's)
        self._skip = 0              # payload bytes still to skip
        self._want = 0              # bytes of the box _leaf to read next, then _rest to skip
        self._rest = 0
        self._leaf = b""
        self._stack: list[tuple[bytes, int | None]] = []   # (type, end offset or None: file end)
        self._dead = False
        self._declared: float | None = None
        self._moov_done = False
        self._movie_scale = 0
        self._movie_duration: int | None = None
        self._fragmented = False     # moov holds mvex
        self._fragments: int | None = None   # mehd's fragment_duration (movie timescale)
        # The open trak: tkhd duration, mdhd (timescale, duration), handler type.
        self._tkhd: int | None = None
        self._media: tuple[int, int | None] | None = None
        self._handler = b""
        self._audio: tuple[int | None, tuple[int, int | None] | None] | None = None  # first 'soun' trak
        self._track = 0              # the open trak's track_ID
        self._audio_track = -1       # the first audio track's
        # Fragments: trex default sample durations by track; whether the open traf is the audio
        # track's, and its tfhd default; the audio samples' duration so far (media timescale);
        # a trun's sample table being read: entries left, bytes each, then what to skip.
        self._trex: dict[int, int] = {}
        self._traf = False
        self._traf_default: int | None = None
        self._samples = 0
        self._entries = 0
        self._entry = 0
        self._after = 0
        self._unknown = False        # a fragment's samples had no duration to be read

    @property
    def declared(self) -> float | None:
        return None if self._dead else self._declared

    @property
    def at_least(self) -> float:
        scale = self._audio_scale()
        return self._samples / scale if scale and not self._dead else 0.0

    def end(self) -> float | None:
        if self._dead:
            return None
        if self._stack and self._stack[0][1] is None:
            # A top-level moov of size 0 runs to the end of the file, which is here.
            while self._stack:
                self._close(self._stack.pop()[0])
        if self._declared is None and self._fragmented and self._moov_done and not self._unknown:
            scale = self._audio_scale()
            return self._samples / scale if scale and self._samples else None
        return self.declared

    def _audio_scale(self) -> int:
        """The first audio track's media timescale, once its trak is read (0 before)."""
        media = self._audio[1] if self._audio is not None else None
        return media[0] if media is not None else 0

    # -- the walk -------------------------------------------------------------------------------

    def _parse(self, d: bytes | memoryview, i: int, n: int) -> int:
        """Consume whole items of d[i:n]: the offset of the first one not complete, -1 on giving up."""
        origin = self._pos - i
        stack = self._stack
        while True:
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                if self._skip:
                    break
            elif self._want:
                want = self._want
                if n - i < want:
                    break
                self._want = 0
                self._read(self._leaf, bytes(d[i:i + want]))
                i += want
                self._skip = self._rest
            elif self._entries:
                # A trun's sample table: each entry's first field is the sample's duration.
                entry, entries = self._entry, self._entries
                whole = min(entries, (n - i) // entry)
                if not whole:
                    break
                table = array.array(_U32)
                table.frombytes(d[i:i + whole * entry])
                if _SWAP:
                    table.byteswap()
                self._samples += sum(table[::entry // 4])  # each entry's first field: its duration
                i += whole * entry
                self._entries = entries - whole
                if not self._entries:
                    self._skip = self._after
            else:
                at = origin + i
                while stack:
                    end = stack[-1][1]
                    if end is None or at < end:
                        break
                    self._close(stack.pop()[0])
                if n - i < 8:
                    break
                size = int.from_bytes(d[i:i + 4], "big")
                kind = bytes(d[i + 4:i + 8])
                head = 8
                if size == 1:
                    if n - i < 16:
                        break
                    size = int.from_bytes(d[i + 8:i + 16], "big")
                    head = 16
                i += head
                self._box(kind, size, head, origin + i)
            if self._dead:
                return -1
        self._pos = origin + i
        return i

    def _box(self, kind: bytes, size: int, head: int, start: int) -> None:
        stack = self._stack
        parent, parent_end = stack[-1] if stack else (b"", None)
        if size == 0 and not stack:
            end = None
        elif size < head:
            self._dead = True   # size 0 inside a box, or smaller than its own header
            return
        else:
            end = start + size - head
        if kind == b"moof" and (parent or not self._moov_done):
            # A fragment before the moov that describes it, or inside another box: decoders
            # disagree on it (ffmpeg reads a moof wherever it is; one before moov, not at all),
            # so the fragments' sum is no longer an answer.
            self._unknown = True
        if parent_end is not None and (end is None or end > parent_end):
            self._dead = True
        elif kind in _ENTER.get(parent, ()) and not (kind == b"moov" and self._moov_done):
            stack.append((kind, end))
            if kind == b"trak":
                self._tkhd, self._media, self._handler, self._track = None, None, b"", 0
            elif kind == b"mvex":
                self._fragmented = True
            elif kind == b"traf":
                self._traf, self._traf_default = False, None
        elif kind in _READ.get(parent, ()) and end is not None and (kind != b"trun" or self._traf):
            want = min(end - start, _READ[parent][kind])
            self._rest = end - start - want
            if want:
                self._want, self._leaf = want, kind
            else:
                self._read(kind, b"")
        else:
            self._skip = _TO_END if end is None else end - start

    def _read(self, kind: bytes, value: bytes) -> None:
        if kind == b"hdlr":
            self._handler = value[8:12]
            return
        if kind in (b"trex", b"tfhd", b"trun"):
            self._fragment(kind, value)
            return
        version = value[0] if value else -1
        wide = version == 1
        if version not in (0, 1) or len(value) < {b"mvhd": 20, b"tkhd": 24, b"mdhd": 20,
                                                   b"mehd": 8}[kind] + 12 * wide:
            self._dead = True
        elif kind == b"mvhd":
            self._movie_scale = int.from_bytes(value[20:24] if wide else value[12:16], "big")
            self._movie_duration = _unsigned(value, 24, 8) if wide else _unsigned(value, 16, 4)
        elif kind == b"tkhd":
            self._tkhd = _unsigned(value, 28, 8) if wide else _unsigned(value, 20, 4)
            self._track = int.from_bytes(value[20:24] if wide else value[12:16], "big")
        elif kind == b"mdhd":
            scale = int.from_bytes(value[20:24] if wide else value[12:16], "big")
            self._media = scale, _unsigned(value, 24, 8) if wide else _unsigned(value, 16, 4)
        elif kind == b"mehd":
            self._fragments = _unsigned(value, 4, 8) if wide else _unsigned(value, 4, 4)

    def _fragment(self, kind: bytes, value: bytes) -> None:
        """trex (a track's default sample duration), tfhd (the traf's track and default), trun
        (its samples: counted by a duration for all, or their table read next)."""
        if len(value) < 8:
            self._dead = True
            return
        flags = int.from_bytes(value[1:4], "big")
        if kind == b"trex":
            if len(value) < 16:
                self._dead = True
            elif len(self._trex) < _TREX_KEPT:
                self._trex.setdefault(int.from_bytes(value[4:8], "big"), int.from_bytes(value[12:16], "big"))
            return
        if kind == b"tfhd":
            at = 8 + 8 * (flags & 0x01) + 4 * (flags >> 1 & 1)  # base_data_offset, description index
            if flags & 0x08 and len(value) < at + 4:
                self._dead = True
            elif self._fragmented and self._moov_done and int.from_bytes(value[4:8], "big") == self._audio_track:
                self._traf = True  # the audio track's fragment: its trun are counted
                self._traf_default = int.from_bytes(value[at:at + 4], "big") if flags & 0x08 else None
            return
        count = int.from_bytes(value[4:8], "big")
        head = 4 * (flags & 0x01) + 4 * (flags >> 2 & 1)  # data_offset, first_sample_flags
        entry = 4 * bin(flags & 0xF00).count("1")  # duration, size, flags, composition offset
        if head + count * entry > self._rest:
            self._dead = True  # its table does not fit in it
        elif flags & 0x100:
            if count:
                self._entries, self._entry = count, entry
                self._after = self._rest - head - count * entry
                self._rest = head  # skipped first; the table is read after it
        else:
            default = self._traf_default if self._traf_default is not None else self._trex.get(self._audio_track)
            if default is None:
                self._unknown = True
            else:
                self._samples += count * default

    def _close(self, kind: bytes) -> None:
        if kind == b"traf":
            self._traf = False
        elif kind == b"trak":
            if self._handler == b"soun" and self._audio is None:
                self._audio = self._tkhd, self._media
                self._audio_track = self._track
        elif kind == b"moov":
            self._moov_done = True
            self._declared = self._duration()

    def _duration(self) -> float | None:
        """Seconds, from what the complete moov said (see the module docstring)."""
        movie = self._movie_scale
        if self._fragmented:
            return self._fragments / movie if movie and self._fragments else None
        if movie and self._movie_duration:
            return self._movie_duration / movie
        tkhd, media = self._audio or (None, None)
        if movie and tkhd:
            return tkhd / movie
        if media is not None and media[0] and media[1]:
            return media[1] / media[0]
        return None
