"""WebM/Matroska duration: Segment Info's Duration, else where the last block ends.

[core] Sans-IO and bounded: the probe walks EBML element headers as the bytes go past, enters only
the few master elements it needs (Segment, Info, Tracks, TrackEntry, Cluster, BlockGroup), reads
at most 16 bytes of a leaf it needs and skips every other payload (frames, CodecPrivate, Cues,
Tags) by its size without looking at it. It keeps at most one partial item (16 bytes), a stack
of three open elements and a few numbers per track (16 tracks at most).

- ``declared``: Info's Duration (a 4- or 8-byte float) times TimecodeScale, once Info has gone
  past (before the first Cluster, in every muxer's output). A file
  written to a pipe or by a browser's MediaRecorder has none: its Segment and Clusters have the
  "unknown size" marker and end where an element that cannot be their child begins.
- ``at_least``: the start of the latest block seen (Cluster Timecode + the block's relative
  timecode). A start is never past the end, whatever a block's duration.
- ``end()``: Duration when there is one (ffprobe reports it as the file's duration), but never
  less than the blocks prove: a Duration that ends before the last block started is not believed.
  Without Duration: where each track's last block ends, its length taken, in order, from its
  BlockDuration, from the Opus TOC of an unlaced ``A_OPUS`` frame (exact: frame size and count),
  from the track's DefaultDuration, minus DiscardPadding (the encoder's padding at the end of
  Opus). A block none of those describe (Vorbis in a live WebM) is taken to last as long as the
  gap to the track's previous block: that is the one estimate, off by the difference of two
  frame lengths (a few ms). None when no Duration and no block was seen.

Gives up (``end()`` None) on what no muxer writes: an ID or size vint that is not one, a child
running past its parent, an unknown size anywhere but a Segment or Cluster, a block before its
Cluster's Timecode, a zero TimecodeScale or one changed after blocks were timed.
"""

from __future__ import annotations

import struct

from .audio import ItemWalker

_EBML = 0x1A45DFA3
_SEGMENT = 0x18538067
_SEEK_HEAD = 0x114D9B74
_INFO = 0x1549A966
_TRACKS = 0x1654AE6B
_CLUSTER = 0x1F43B675
_CUES = 0x1C53BB6B
_ATTACHMENTS = 0x1941A469
_CHAPTERS = 0x1043A770
_TAGS = 0x1254C367
_TRACK_ENTRY = 0xAE
_BLOCK_GROUP = 0xA0

_TIMECODE_SCALE = 0x2AD7B1
_DURATION = 0x4489
_TRACK_NUMBER = 0xD7
_CODEC_ID = 0x86
_DEFAULT_DURATION = 0x23E383
_TIMECODE = 0xE7
_SIMPLE_BLOCK = 0xA3
_BLOCK = 0xA1
_BLOCK_DURATION = 0x9B
_DISCARD_PADDING = 0x75A2

# The masters entered, by parent (0: the top level). Any other element is skipped, so the stack
# is never deeper than Segment > Cluster > BlockGroup, whatever the file nests.
_ENTER = {0: {_SEGMENT}, _SEGMENT: {_INFO, _TRACKS, _CLUSTER}, _TRACKS: {_TRACK_ENTRY},
          _CLUSTER: {_BLOCK_GROUP}}
# The leaves read, by parent; the first bytes of a block hold its track, timecode, flags and the
# Opus TOC, which is all that is needed of it.
_READ = {_INFO: {_TIMECODE_SCALE, _DURATION},
         _TRACK_ENTRY: {_TRACK_NUMBER, _CODEC_ID, _DEFAULT_DURATION},
         _CLUSTER: {_TIMECODE, _SIMPLE_BLOCK},
         _BLOCK_GROUP: {_BLOCK, _BLOCK_DURATION, _DISCARD_PADDING}}
_LEVEL1 = frozenset({_SEEK_HEAD, _INFO, _TRACKS, _CLUSTER, _CUES, _ATTACHMENTS, _CHAPTERS, _TAGS})
# An unknown-size element ends where one of these begins (Matroska: the next element that is not
# one of its children). Anything else inside it is a child, known or skipped.
_ENDED_BY = {_SEGMENT: frozenset({_EBML, _SEGMENT}),
             _CLUSTER: _LEVEL1 | {_EBML, _SEGMENT}}

_ITEM = 16      # the most one item (an element header, a leaf read) needs: 4 + 8 header bytes
_TRACKS_KEPT = 16
_NS = 1_000_000_000
_OPUS = b"A_OPUS"
# Opus TOC config (RFC 6716 3.1) -> frame length in 48 kHz samples: SILK, Hybrid, CELT.
_OPUS_FRAME = ((480, 960, 1920, 2880) * 3 + (480, 960) * 2 + (120, 240, 480, 960) * 4)
# A track's latest block: tick, its first bytes, the tick of the block before it (None if none),
# BlockDuration in ticks (None if none), DiscardPadding in ns.
_Last = tuple[int, bytes, int | None, int | None, int]


def _vint_length(first: int) -> int:
    """Bytes in an EBML variable-length integer from its first byte (0: not a vint)."""
    return 9 - first.bit_length() if first else 0


_VINT_LENGTH = bytes(_vint_length(first) for first in range(256))   # the same, looked up


def sniff(head: bytes) -> bool:
    """An EBML header: WebM and Matroska (nothing else an upload carries starts so)."""
    return head[:4] == b"\x1a\x45\xdf\xa3"


class MatroskaProbe(ItemWalker):
    """How long a WebM/Matroska file is, from its bytes in order (see the module docstring)."""

    _ITEM = _ITEM  # the shared feed reads it from the class
    __slots__ = ("_buf", "_pos", "_skip", "_want", "_rest", "_leaf_id", "_stack", "_dead",
                 "_scale", "_duration", "_declared", "_info_done", "_cluster", "_number", "_opus",
                 "_default", "_block", "_block_duration", "_padding", "_codecs", "_last",
                 "_last_tick")

    def __init__(self) -> None:
        self._buf = bytearray()      # the start of an item cut by a feed boundary (< _ITEM bytes)
        self._pos = 0                # stream offset of the first byte not consumed (the buf's)
        self._skip = 0               # payload bytes still to skip
        self._want = 0               # bytes of the leaf _leaf_id to read next, then _rest to skip
        self._rest = 0
        self._leaf_id = 0
        self._stack: list[tuple[int, int | None, bool]] = []  # (id, end offset, unknown size)
        self._dead = False
        self._scale = 1_000_000      # TimecodeScale: ns per tick (Matroska's default)
        self._duration: float | None = None    # Info's Duration, in ticks
        self._declared: float | None = None    # seconds, once the Info holding it has ended
        self._info_done = False                # a second Info is skipped, not believed
        self._cluster: int | None = None       # the open Cluster's Timecode
        # The open TrackEntry: TrackNumber, CodecID is A_OPUS, DefaultDuration (ns).
        self._number = 0
        self._opus = False
        self._default = 0
        # The open BlockGroup: its Block (track, tick, first bytes), BlockDuration, DiscardPadding.
        self._block: tuple[int, int, bytes] | None = None
        self._block_duration: int | None = None
        self._padding = 0
        self._codecs: dict[int, tuple[bool, int]] = {}   # track -> (A_OPUS, DefaultDuration ns)
        # track -> its latest block (_Last). Only the last block's length matters, so it is
        # worked out once, at the end, not for every block.
        self._last: dict[int, _Last] = {}
        self._last_tick: int | None = None      # the latest block start, in ticks

    @property
    def declared(self) -> float | None:
        return None if self._dead else self._declared

    @property
    def at_least(self) -> float:
        # Kept after giving up: those blocks went past, whatever came after them.
        if self._last_tick is None or self._last_tick < 0:
            return 0.0
        return self._last_tick * self._scale / _NS

    def end(self) -> float | None:
        if self._dead:
            return None
        while self._stack:   # a file may stop inside its Segment, Cluster or BlockGroup
            self._close(self._stack.pop()[0])
        seen = self._blocks_end()
        declared = self.declared
        if declared is not None:
            return max(declared, self.at_least)
        return None if seen is None else max(seen, 0) / _NS

    # -- the walk -------------------------------------------------------------------------------

    def _parse(self, d: bytes | memoryview, i: int, n: int) -> int:
        """Consume whole items of d[i:n]: the offset of the first one not complete, -1 on giving up."""
        if type(d) is not bytes:
            # A block a frame (every 20 ms): indexing bytes is about twice as fast as a memoryview,
            # which more than pays for the copy of the chunk.
            d = bytes(d)
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
                self._leaf(self._leaf_id, bytes(d[i:i + want]))
                i += want
                self._skip = self._rest
            else:
                at = origin + i
                while stack:
                    end = stack[-1][1]
                    if end is None or at < end:
                        break
                    self._close(stack.pop()[0])
                if i >= n:
                    break
                id_length = _VINT_LENGTH[d[i]]
                if not 0 < id_length <= 4:
                    self._dead = True
                    return -1
                if n - i <= id_length:
                    break
                size_length = _VINT_LENGTH[d[i + id_length]]
                if not size_length:
                    self._dead = True
                    return -1
                head = id_length + size_length
                if n - i < head:
                    break
                element = int.from_bytes(d[i:i + id_length], "big")
                all_ones = (1 << 7 * size_length) - 1
                size = int.from_bytes(d[i + id_length:i + head], "big") & all_ones
                i += head
                if (element == _SIMPLE_BLOCK and 4 <= size < all_ones and n - i >= _ITEM
                        and d[i] & 0x80 and self._cluster is not None and stack[-1][0] == _CLUSTER
                        and (stack[-1][1] is None or origin + i + size <= stack[-1][1])):
                    # The hot path, one per frame: a SimpleBlock of a track numbered below 127
                    # in a Cluster, its head in this chunk. Time it and skip its frame.
                    tick = self._cluster + ((d[i + 1] << 8 | d[i + 2]) ^ 0x8000) - 0x8000
                    self._note(d[i] & 0x7F, tick, bytes(d[i:i + min(size, _ITEM)]), None, 0)
                    if size < n - i:
                        i = self._run(d, i + size, n, origin, d[i] & 0x7F)
                    else:
                        k = min(size, n - i)
                        i += k
                        self._skip = size - k
                else:
                    self._element(element, size, size == all_ones, origin + i)
            if self._dead:
                return -1
        self._pos = origin + i
        return i

    def _run(self, d: bytes, i: int, n: int, origin: int, track: int) -> int:
        """The SimpleBlocks of ``track`` that follow d[i] whole in this chunk and in the open
        Cluster (an audio track's frames, one after another): timed as ``_note`` would time them
        one by one, but with the track's latest block kept in locals and noted once at the end.
        Where the general walk goes on (the first element that is not such a block)."""
        last = self._last.get(track)
        if last is None:  # not kept (too many tracks): each block goes the general way
            return i
        cluster, limit = self._cluster, self._stack[-1][1]
        assert cluster is not None
        tick, before = last[0], last[2]
        top = self._last_tick if self._last_tick is not None else tick
        at = -1  # where the latest block kept here starts, -1 if none was
        size = 0
        head = 0x80 | track if track < 0x80 else -1  # the block's track number, a one-byte vint
        bound = limit - origin if limit is not None else 1 << 62  # the Cluster's end, in d's offsets
        # An element header of at most 9 bytes, then a block head of _ITEM, all in this chunk.
        stop = n - 9 - _ITEM
        while i <= stop and d[i] == 0xA3:
            # The block's size: one or two bytes in every muxer seen (ffmpeg writes two), read
            # without a slice; longer ones the general way. All ones is an unknown size.
            first = d[i + 1]
            if first & 0x80:
                block, j = first & 0x7F, i + 2
                if not 4 <= block < 0x7F:
                    break
            elif first & 0x40:
                block, j = (first & 0x3F) << 8 | d[i + 2], i + 3
                if not 4 <= block < 0x3FFF:
                    break
            else:
                length = _VINT_LENGTH[first]
                if not length:
                    break
                all_ones = (1 << 7 * length) - 1
                j = i + 1 + length
                block = int.from_bytes(d[i + 1:j], "big") & all_ones
                if not 4 <= block < all_ones:
                    break
            if d[j] != head or j + block > bound:
                break
            t = cluster + ((d[j + 1] << 8 | d[j + 2]) ^ 0x8000) - 0x8000
            if t > top:
                top = t
            if t >= tick:
                if t > tick:
                    before = tick
                tick, at, size = t, j, block
            i = j + block
            if i > n or i >= bound:
                break
        if at >= 0:
            self._last[track] = tick, bytes(d[at:at + min(size, _ITEM)]), before, None, 0
        self._last_tick = top
        if i > n:  # the last block's frame runs on into the next chunk
            self._skip = i - n
            return n
        return i

    def _element(self, element: int, size: int, unknown: bool, start: int) -> None:
        stack = self._stack
        while stack and stack[-1][2] and element in _ENDED_BY.get(stack[-1][0], ()):
            self._close(stack.pop()[0])
        parent, parent_end = (stack[-1][0], stack[-1][1]) if stack else (0, None)
        end = parent_end if unknown else start + size
        if parent_end is not None and end is not None and end > parent_end:
            self._dead = True
        elif element in _ENTER.get(parent, ()) and not (element == _INFO and self._info_done):
            if unknown and element not in _ENDED_BY:
                self._dead = True
                return
            stack.append((element, end, unknown))
            if element == _CLUSTER:
                self._cluster = None
            elif element == _TRACK_ENTRY:
                self._number, self._opus, self._default = 0, False, 0
            elif element == _BLOCK_GROUP:
                self._block, self._block_duration, self._padding = None, None, 0
        elif unknown:
            self._dead = True   # it cannot be skipped: where does it end?
        elif element in _READ.get(parent, ()):
            want = min(size, _ITEM)
            self._rest = size - want
            if want:
                self._want, self._leaf_id = want, element
            else:
                self._leaf(element, b"")
        else:
            self._skip = size

    def _leaf(self, element: int, value: bytes) -> None:
        if element in (_SIMPLE_BLOCK, _BLOCK):
            track_length = _vint_length(value[0]) if value else 0
            if not track_length or len(value) < track_length + 3 or self._cluster is None:
                self._dead = True
                return
            track = int.from_bytes(value[:track_length], "big") & ((1 << 7 * track_length) - 1)
            tick = self._cluster + int.from_bytes(value[track_length:track_length + 2], "big", signed=True)
            if element == _SIMPLE_BLOCK:
                self._note(track, tick, value, None, 0)
            else:
                self._block = track, tick, value
        elif element == _CODEC_ID:
            self._opus = value == _OPUS
        elif element == _DURATION:
            if len(value) in (4, 8):
                duration = struct.unpack(">f" if len(value) == 4 else ">d", value)[0]
                if 0 <= duration < 1e18:   # not negative, NaN or infinite
                    self._duration = duration
                else:
                    self._dead = True
            elif value or self._rest:
                self._dead = True
        elif len(value) > 8 or self._rest:
            self._dead = True   # no integer element is longer than 8 bytes
        elif element == _DISCARD_PADDING:
            self._padding = int.from_bytes(value, "big", signed=True)
        else:
            number = int.from_bytes(value, "big")
            if element == _TIMECODE:
                self._cluster = number
            elif element == _TIMECODE_SCALE:
                if number == 0 or (self._last_tick is not None and number != self._scale):
                    self._dead = True
                self._scale = number
            elif element == _TRACK_NUMBER:
                self._number = number
            elif element == _DEFAULT_DURATION:
                self._default = number
            elif element == _BLOCK_DURATION:
                self._block_duration = number

    def _close(self, element: int) -> None:
        if element == _BLOCK_GROUP:
            if self._block is not None:
                self._note(*self._block, self._block_duration, self._padding)
            self._block = None
        elif element == _TRACK_ENTRY:
            if self._number in self._codecs or len(self._codecs) < _TRACKS_KEPT:
                self._codecs[self._number] = self._opus, self._default
        elif element == _CLUSTER:
            self._cluster = None
        elif element == _INFO:
            # Duration and TimecodeScale may come in either order: both are known here.
            self._info_done = True
            if self._duration is not None:
                self._declared = self._duration * self._scale / _NS

    # -- blocks ---------------------------------------------------------------------------------

    def _note(self, track: int, tick: int, head: bytes, duration: int | None, padding: int) -> None:
        """A block of `track` starts at `tick`; `head` is its first bytes (track, timecode, flags,
        the first bytes of its frames)."""
        if self._last_tick is None or tick > self._last_tick:
            self._last_tick = tick
        last = self._last.get(track)
        if last is None:
            if len(self._last) < _TRACKS_KEPT:
                self._last[track] = tick, head, None, duration, padding
        elif tick >= last[0]:
            self._last[track] = tick, head, last[0] if tick > last[0] else last[2], duration, padding

    def _length(self, track: int, head: bytes, duration: int | None) -> int:
        """ns that a block lasts by what it and its track say, -1 if they do not say."""
        if duration is not None:
            return duration * self._scale
        opus, default = self._codecs.get(track, (False, 0))
        frames_at = _vint_length(head[0]) + 3
        laced = head[frames_at - 1] & 0x06
        if opus and not laced and len(head) > frames_at:
            toc = head[frames_at]
            count = (1, 2, 2, 0)[toc & 3]
            if not count and len(head) > frames_at + 1:
                count = head[frames_at + 1] & 0x3F   # code 3: the count is in the next byte
            return _OPUS_FRAME[toc >> 3] * count * _NS // 48000 if count else -1
        if default and not laced:
            return default
        if default and len(head) > frames_at:
            return default * (head[frames_at] + 1)   # a laced block: frames - 1, then the sizes
        return -1

    def _blocks_end(self) -> int | None:
        """ns: where the last block of each track ends (see the module docstring), the latest."""
        if self._last_tick is None:
            return None
        scale = self._scale
        ends = [self._last_tick * scale]
        for track, (tick, head, before, duration, padding) in self._last.items():
            start = tick * scale
            length = self._length(track, head, duration)
            if length >= 0:
                ends.append(start + length - max(padding, 0))
            elif before is not None:
                ends.append(start + (tick - before) * scale)
        return max(ends)
