"""MP3 (MPEG audio layers I-III) and AAC in ADTS: duration from frame headers as they stream past.

[core] Sans-IO (see aisix/audio.py): between feeds it keeps at most one candidate frame and the
next frame's first four bytes (8 KiB at worst, an ADTS frame), never the audio; a frame's body is
passed over by count, so the Python work is per frame, not per byte.

Both formats are a run of self-describing frames: a header with a sync word, the frame's length
in bytes and the samples it decodes to (MPEG: 384, 576 or 1152 by version and layer; ADTS: 1024
per raw data block). The duration is the samples of the audio frames walked over the sample rate.
Layer bits ``00`` are ADTS, anything else MPEG audio, so the two never claim each other's frames.

- ID3v2 tags before the first frame are passed over by their stated size (with the footer, when
  flagged), as ffmpeg does. Any other bytes that are not a frame where one should start (an
  ID3v1 or APE tag at the end, a tag appended later, padding, garbage) are searched through for
  the next frame with ``bytes.find``, never skipped by a size they state: a fake tag header in
  the middle of a file cannot hide the audio after it from the count, while the decoder upstream
  plays it.
- A frame found by searching counts only once the next frame's header is there and agrees with it
  (same version, layer and sample rate; for ADTS, profile and sample rate), or it ends exactly at
  the end of the file: a stray 0xFF in a tag or in garbage is not a frame. Frames that follow one
  another need no such check.
- ``declared`` comes from a Xing/Info or VBRI header in the first MP3 frame: the number of audio
  frames, that frame being the header and no audio itself. ``end()`` still answers from the
  frames walked, so a header that understates the length is found out by ``at_least``. ffprobe
  reports the frames without taking the encoder delay and padding off, and so does this probe.
  ADTS states no duration.
- A frame cut short by the end of the file does not count. Free-format MP3 (bitrate index 0) is
  not read: such a file answers None.
"""

from __future__ import annotations

import re

from .audio import Chunk

# MPEG audio: kbit/s by (MPEG-1?, layer bits) and bitrate index 1-14.
_BITRATES = {
    (True, 3): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),   # layer I
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),      # layer II
    (True, 1): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),       # layer III
    (False, 3): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 1): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPEG1_RATES = (44100, 48000, 32000)
_ADTS_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
_VERSION_SHIFT = {3: 0, 2: 1, 0: 2}  # version bits -> halvings of the MPEG-1 rate (1 is reserved)
_HEAD = 7  # bytes a candidate frame header is read from (an ADTS header; an MPEG one is 4)
_VBR_TAG_END = 4 + 32 + 18  # the VBRI fields end here; a Xing frame count ends before


def _mpeg_frame(b1: int, b2: int) -> tuple[int, int, int]:
    """(bytes, samples, rate) of an MPEG audio frame from header bytes 1 and 2; (0, 0, 0) if invalid."""
    version, layer = (b1 >> 3) & 3, (b1 >> 1) & 3
    index, rate_index, padding = b2 >> 4, (b2 >> 2) & 3, (b2 >> 1) & 1
    if version == 1 or layer == 0 or index in (0, 15) or rate_index == 3:
        return 0, 0, 0
    mpeg1 = version == 3
    rate = _MPEG1_RATES[rate_index] >> _VERSION_SHIFT[version]
    bitrate = _BITRATES[mpeg1, layer][index - 1] * 1000
    if layer == 3:
        return (12 * bitrate // rate + padding) * 4, 384, rate
    if layer == 1 and not mpeg1:
        return 72 * bitrate // rate + padding, 576, rate
    return 144 * bitrate // rate + padding, 1152, rate


# Indexed by (header byte 1 & 0x1F) << 8 | header byte 2, for byte 1 >= 0xE0 (the sync's last bits).
_MPEG_FRAMES = [_mpeg_frame(0xE0 | (i >> 8), i & 0xFF) for i in range(1 << 13)]
# A padded CBR stream (44.1 kHz: frames of L and L+1 bytes, as the padding bit says) cannot be
# checked by slicing; the regex engine walks it instead, several times faster than Python: by
# stream and bit rate (header byte 1 with its CRC bit set, byte 2 without its padding and private
# bits), a pattern for a run of frames of either length, the CRC and private bits either way as
# the walk takes them. Where the match ends is all the count needs: k frames of `short` or `long`
# (short + d) bytes span from short*k to long*k bytes, and while k < short/d no other k fits the
# same span, so k is ceil(span / long). A match is capped at that many frames. At most 16 x 64
# keys, each compiled once per process: frames that flip those bits cannot make it compile again.
# Beside it, the same run with the header bytes as encoders write them (no CRC, private bit
# clear) as literals, which the regex engine takes faster than classes (18 against 25 us per
# 256 KiB); the general pattern goes on from wherever that one stops. The repeats are greedy, not
# possessive: a possessive repeat would keep no backtracking state, but CPython 3.11.0-3.11.4
# (Debian 12 ships 3.11.2) end such a match 2 bytes past a part-way failed alternative (gh-106052),
# which miscounts a run that ends on a cut or foreign frame.
_PADDED: dict[tuple[int, int], tuple[re.Pattern[bytes], re.Pattern[bytes], int] | None] = {}
# Frames checked by slicing at first, twice as many after each check that held: a stream that
# breaks often costs no more, and a long run of one header takes few checks.
_RUN_CHECK = 64


def _padded_patterns(b1: int, b2: int,
                     lengths: list[int]) -> tuple[re.Pattern[bytes], re.Pattern[bytes], int] | None:
    """(a run of this stream's frames with the header bytes encoders write, a run of them with
    the CRC and private bits either way, each capped where its span still tells its count; the
    padded frame's length), or None when the stream has no padded frames."""
    sync1, base = key = (b1 | 0x01, b2 & 0xFC)
    if key not in _PADDED:
        short, long = lengths[base], lengths[base | 0x02]
        if short < 4 or long <= short:
            _PADDED[key] = None
        else:
            most = (short - 1) // (long - short)  # k * d < short for every k up to this

            def run(sync: bytes, unpadded: bytes, padded: bytes) -> re.Pattern[bytes]:
                one = sync + unpadded + b".{%d}|" % (short - 3) + sync + padded + b".{%d}" % (long - 3)
                return re.compile(b"(?:" + one + b"){0,%d}" % most, re.S)

            def either(a: int, b: int) -> bytes:
                return b"[" + re.escape(bytes((a,))) + re.escape(bytes((b,))) + b"]"

            def byte(a: int) -> bytes:
                return re.escape(bytes((a,)))

            plain = run(b"\xff" + byte(sync1), byte(base), byte(base | 0x02))
            general = run(b"\xff" + either(sync1 & 0xFE, sync1), either(base, base | 0x01),
                          either(base | 0x02, base | 0x03))
            _PADDED[key] = plain, general, long
    return _PADDED[key]


def _padded_run(patterns: tuple[re.Pattern[bytes], re.Pattern[bytes], int], buf: bytes | memoryview,
                at: int) -> tuple[int, int]:
    """(the frames of the run that _padded_patterns match from buf[at], where it stops)."""
    plain, general, long = patterns
    count, stop = 0, at
    for many in (plain, general):
        while True:  # {0,most} always matches; an empty match ends the run
            end = many.match(buf, stop).end()  # type: ignore[union-attr]
            if end == stop:
                break
            count += -(-(end - stop) // long)  # ceil: the one count that fits
            stop = end
    return count, stop


# The frame walk's tables: for header byte 1 & 0x1F and the sample rate bits of byte 2, the frame
# length by header byte 2 (0: no frame of that stream).
_MPEG_LENGTHS = [[_MPEG_FRAMES[(k << 8) | b][0] if b & 0x0C == r else 0 for b in range(256)]
                 for k in range(32) for r in (0x00, 0x04, 0x08, 0x0C)]


def _frame(buf: bytes, at: int) -> tuple[int, int, int, int, int] | None:
    """(bytes, samples, rate, key1, key2) of a frame header at buf[at:at+7], or None.

    key1/key2 are what every frame of the same stream shares: header byte 1 (the protection bit
    cleared for MPEG) and byte 2 masked to the sample rate (and profile, for ADTS).
    """
    if buf[at] != 0xFF:
        return None
    b1 = buf[at + 1]
    if b1 < 0xE0:
        return None
    b2 = buf[at + 2]
    if b1 & 0xF6 == 0xF0:  # 12-bit sync and layer 00: ADTS
        sf = (b2 >> 2) & 0xF
        length = ((buf[at + 3] & 3) << 11) | (buf[at + 4] << 3) | (buf[at + 5] >> 5)
        if sf >= len(_ADTS_RATES) or length < (7 if b1 & 1 else 9):
            return None
        return length, 1024 * ((buf[at + 6] & 3) + 1), _ADTS_RATES[sf], b1, b2 & 0xFC
    length, samples, rate = _MPEG_FRAMES[((b1 & 0x1F) << 8) | b2]
    if not length:
        return None
    return length, samples, rate, b1 | 1, b2 & 0x0C


def _byte_class(valid: list[int]) -> bytes:
    return b"[" + b"".join(b"\\x%02x" % byte for byte in valid) + b"]"


# Where a frame may start: 0xFF, then a byte 1 and a byte 2 that some MPEG or ADTS header allows.
# Searched by the regex engine, so the bytes between candidates cost no Python work.
_CANDIDATE = re.compile(
    b"\\xff"
    + _byte_class([b1 for b1 in range(0xE0, 0x100) if b1 & 0xF6 == 0xF0 or any(_MPEG_FRAMES[((b1 & 0x1F) << 8) | b2][0]
                                                                              for b2 in range(256))])
    + _byte_class([b2 for b2 in range(256) if (b2 >> 2) & 0xF < len(_ADTS_RATES) or any(
        _MPEG_FRAMES[((b1 & 0x1F) << 8) | b2][0] for b1 in range(0xE0, 0x100))]))


def _id3_size(buf: bytes, at: int) -> int | None:
    """The whole size of the ID3v2 tag whose 10-byte header is at buf[at:], or None if it is none."""
    head = buf[at:at + 10]
    if head[:3] != b"ID3" or head[3] == 0xFF or head[4] == 0xFF or max(head[6:10]) >= 0x80:
        return None
    size = (head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9]
    return 10 + size + (10 if head[5] & 0x10 else 0)


def _vbr_frames(frame: bytes, b3: int, mpeg1: bool) -> int | None:
    """The frame count of a Xing/Info or VBRI header in this (first) MP3 frame, if it has one."""
    mono = b3 >> 6 == 3
    at = 4 + (17 if mono else 32) if mpeg1 else 4 + (9 if mono else 17)
    if frame[at:at + 4] in (b"Xing", b"Info"):
        flags = int.from_bytes(frame[at + 4:at + 8], "big")
        if flags & 1 and len(frame) >= at + 12:
            return int.from_bytes(frame[at + 8:at + 12], "big") or None
        return None
    if frame[36:40] == b"VBRI" and len(frame) >= _VBR_TAG_END and frame[40:42] == b"\x00\x01":
        return int.from_bytes(frame[50:54], "big") or None
    return None


def sniff(head: bytes) -> bool:
    """An ID3v2 tag, or an MPEG audio or ADTS frame header, at the start."""
    if head[:3] == b"ID3":
        size = _id3_size(head, 0) if len(head) >= 10 else None
        # A tag that ends within the head shows what follows: FLAC files carry ID3v2 too.
        return size is None or head[size:size + 4] != b"fLaC"
    return len(head) >= _HEAD and _frame(head, 0) is not None


_FRAMES, _SEARCH, _GAVE_UP = 0, 1, 2
# Candidates in a row that turn out to be no frame before the probe gives up: real garbage and
# tags (cover art included) hold about one per 4 KiB; a file built to be all candidates would
# otherwise cost Python work every few bytes.
_MAX_MISSES = 1 << 16


class Mpeg:
    """Probe for an MP3 or ADTS AAC stream (aisix.audio.Probe)."""

    __slots__ = ("_mode", "_carry", "_want", "_skip", "_pending", "_samples", "_rate", "_key1", "_key2",
                 "_adts", "_declared", "_misses", "_padded")

    def __init__(self) -> None:
        self._mode = _FRAMES      # at a frame boundary (or a tag), or searching for a frame
        self._carry = bytearray()  # bytes from a boundary or candidate frame on, until _want of them
        self._want = 0
        self._skip = 0            # bytes of the current frame or tag still to pass over
        self._pending = 0         # samples of the frame being passed over, counted once it ends
        self._samples = 0
        self._rate = 0
        self._key1 = -1           # the stream's header bytes 1 and 2 (masked), once a frame is found
        self._key2 = -1
        self._adts = False
        self._declared: float | None = None
        self._misses = 0          # candidates found no frame since the last frame
        self._padded: bool | None = None  # MPEG: frames padded one in a while (None: not seen yet)

    @property
    def declared(self) -> float | None:
        return self._declared

    @property
    def at_least(self) -> float:
        return self._samples / self._rate if self._rate else 0.0

    @property
    def codec(self) -> str | None:
        """"mp3" (any MPEG audio layer) or "aac" once a frame has been found."""
        return None if not self._rate else "aac" if self._adts else "mp3"

    def state_size(self) -> int:
        """Bytes held between feeds (for the tests' bound)."""
        return len(self._carry)

    def end(self) -> float | None:
        if self._mode == _GAVE_UP:
            return None
        carry = bytes(self._carry)
        if self._mode == _SEARCH and len(carry) >= _HEAD:
            # A candidate frame that the end of the file confirms: it ends exactly there.
            frame = _frame(carry, 0)
            if frame and frame[0] <= len(carry) < frame[0] + 4 and self._agrees(frame):
                return (self._samples + frame[1]) / frame[2]
        if not self._rate:
            return None
        return self._samples / self._rate

    def _agrees(self, frame: tuple[int, int, int, int, int]) -> bool:
        return self._key1 < 0 or (frame[3] == self._key1 and frame[4] == self._key2)

    def feed(self, data: Chunk) -> None:
        if self._mode == _GAVE_UP:
            return
        view = memoryview(data)
        view = (view if view.c_contiguous else memoryview(view.tobytes())).cast("B")
        n = len(view)
        at = 0
        if self._skip:
            if n < self._skip:
                self._skip -= n
                return
            at, self._skip = self._skip, 0
            self._samples += self._pending
            self._pending = 0
            if at == n:
                return
        if self._carry:
            if len(self._carry) + n - at < self._want:
                self._carry += view[at:]
                return
            buf = bytes(self._carry) + view[at:]
            self._carry.clear()
            at = 0
        elif type(data) is bytes:  # exactly bytes: immutable, walked where it lies
            buf = data
        else:
            # A view (the rewriter's file bytes): a padded run is matched on it in place, and
            # only what follows the run, usually part of a frame, is copied for the walk.
            if self._padded is not False and self._mode == _FRAMES and self._key1 >= 0 and not self._adts:
                at = self._run(view, at)
                if at == n:
                    return
            buf = bytes(view[at:])
            at = 0
        self._walk(buf, at)

    def _hold(self, buf: bytes, at: int, want: int) -> None:
        self._carry += buf[at:]
        self._want = want

    def _run(self, view: memoryview, at: int) -> int:
        """Count the padded run of this stream's frames from view[at], if one starts there; where
        it stops (at itself when none does). The regex engine reads a view as fast as bytes."""
        key1 = self._key1
        if len(view) - at < 4 or view[at] != 0xFF or view[at + 1] | 1 != key1:
            return at
        lengths = _MPEG_LENGTHS[(key1 & 0x1F) << 2 | self._key2 >> 2]
        length = lengths[view[at + 2]]
        if not length:
            return at
        if self._padded is None:
            # Told once per stream by its first two frames here: padded ones (44.1 kHz, the commonest
            # rate) are run by the regex engine; frames of one length are checked faster by slicing
            # bytes, as the walk does. Either way the count is the same.
            following = at + length
            self._padded = bool(view[at + 2] & 0x02 or (following + 3 <= len(view) and view[following] == 0xFF
                                                        and view[following + 2] & 0x02))
            if not self._padded:
                return at
        patterns = _padded_patterns(view[at + 1], view[at + 2], lengths)
        if patterns is None:
            return at
        count, stop = _padded_run(patterns, view, at)
        self._samples += count * _MPEG_FRAMES[((key1 & 0x1F) << 8) | self._key2 | 0x10][1]
        return stop

    def _walk(self, buf: bytes, at: int) -> None:
        while at >= 0:
            at = self._frames(buf, at) if self._mode == _FRAMES else self._search(buf, at) \
                if self._mode == _SEARCH else -1

    def _frames(self, buf: bytes, at: int) -> int:
        """Walk frames that follow one another from buf[at]; -1 once buf is used up, else where the
        search for a frame starts."""
        n = len(buf)
        key1, key2, samples = self._key1, self._key2, 0
        if self._adts:
            least = 7 if key1 & 1 else 9  # the header alone, without or with its CRC
            while at + 7 <= n and buf[at] == 0xFF and buf[at + 1] == key1 and buf[at + 2] & 0xFC == key2:
                length = ((buf[at + 3] & 3) << 11) | (buf[at + 4] << 3) | (buf[at + 5] >> 5)
                if length < least:
                    break
                at += length
                if at > n:
                    self._skip, self._pending = at - n, 1024 * ((buf[at - length + 6] & 3) + 1)
                    break
                samples += 1024 * ((buf[at - length + 6] & 3) + 1)
        else:
            # Samples per frame and the sample rate are the stream's (its header bytes 1 and 2 are
            # the key): only the length changes from frame to frame, with the bit rate or padding.
            lengths = _MPEG_LENGTHS[(key1 & 0x1F) << 2 | key2 >> 2]
            spf = _MPEG_FRAMES[((key1 & 0x1F) << 8) | key2 | 0x10][1]
            count, runs, last, most = 0, True, n - 4, _RUN_CHECK
            while at <= last and buf[at] == 0xFF and buf[at + 1] | 1 == key1:
                length = lengths[buf[at + 2]]
                if not length:  # another sample rate, or no frame at all
                    break
                if runs:
                    # A run of frames with this very header (constant bit rate, no padding): the
                    # same three bytes every `length` bytes, checked by slicing rather than one
                    # frame at a time, _RUN_CHECK frames at first, doubling. Tried once per chunk and
                    # after a run that held: a padded stream (44.1 kHz CBR alternates frame
                    # lengths) fails it, and retrying at every frame would slice on each time.
                    run = min((n - at) // length - 1, most)
                    if run > 1:
                        end = at + length * (run + 1)
                        head = buf[at:at + 3]
                        if (buf[at + length:end:length] == head[:1] * run
                                and buf[at + length + 1:end:length] == head[1:2] * run
                                and buf[at + length + 2:end:length] == head[2:3] * run):
                            count += run + 1
                            at = end
                            most *= 2
                            continue
                        runs = False
                        # Not one header throughout: frames of this header with or without
                        # padding, as many as follow whole (the regex engine's parse is the
                        # walk's: the byte after the sync decides each frame's length).
                        patterns = _padded_patterns(buf[at + 1], buf[at + 2], lengths)
                        if patterns is not None:
                            frames, stop = _padded_run(patterns, buf, at)
                            count += frames
                            if stop > at:
                                at = stop
                                continue
                at += length
                if at > n:
                    self._skip, self._pending = at - n, spf
                    break
                count += 1
            samples = count * spf
        self._samples += samples
        if self._skip:
            return -1
        if n - at < _HEAD:
            if at < n:
                self._hold(buf, at, _HEAD)
            return -1
        if self._key1 < 0 and buf.startswith(b"ID3", at):
            # Before the first frame, an ID3v2 tag is passed over by its stated size, as ffmpeg does.
            if n - at < 10:
                self._hold(buf, at, 10)
                return -1
            size = _id3_size(buf, at)
            if size is not None:
                at += size
                if at > n:
                    self._skip = at - n
                    return -1
                return at
        self._mode = _SEARCH
        return at

    def _search(self, buf: bytes, at: int) -> int:
        """Look for a frame from buf[at]; -1 once buf is used up, else where frames start."""
        n = len(buf)
        while True:
            match = _CANDIDATE.search(buf, at)
            if match is None:  # the last two bytes may yet begin one
                if n - at > 2 and buf.find(b"\xff", n - 2) < 0:
                    return -1
                self._hold(buf, max(at, n - 2), _HEAD)
                return -1
            at = match.start()
            if n - at < _HEAD:
                self._hold(buf, at, _HEAD)
                return -1
            frame = _frame(buf, at)
            if frame is None or not self._agrees(frame):
                at = self._miss(at)
                if at < 0:
                    return -1
                continue
            length, samples, rate, key1, key2 = frame
            if self._key1 < 0 and key1 & 0xF6 != 0xF0:  # the first MP3 frame: a Xing/VBRI header?
                look = min(length, _VBR_TAG_END)
                if n - at < look:
                    self._hold(buf, at, look)
                    return -1
                count = _vbr_frames(buf[at:at + look], buf[at + 3], key1 & 0x18 == 0x18)
                if count is not None:
                    self._found(frame)
                    self._declared = count * samples / rate
                    return self._past(at + length, n, 0)
            following = at + length
            if n - following < 4:
                self._hold(buf, at, length + 4)
                return -1
            adts = key1 & 0xF6 == 0xF0
            if buf[following] != 0xFF or (buf[following + 1] if adts else buf[following + 1] | 1) != key1 or (
                    buf[following + 2] & (0xFC if adts else 0x0C)) != key2:
                at = self._miss(at)
                if at < 0:
                    return -1
                continue
            self._found(frame)
            self._samples += samples
            return following

    def _miss(self, at: int) -> int:
        """A candidate that was no frame: where to search on, or -1 when there were too many."""
        self._misses += 1
        if self._misses > _MAX_MISSES:
            self._mode = _GAVE_UP  # at_least keeps what was seen; end() can no longer tell
            self._carry.clear()
            return -1
        return at + 1

    def _found(self, frame: tuple[int, int, int, int, int]) -> None:
        self._mode, self._misses = _FRAMES, 0
        if self._key1 < 0:
            self._key1, self._key2, self._rate = frame[3], frame[4], frame[2]
            self._adts = frame[3] & 0xF6 == 0xF0

    def _past(self, at: int, n: int, pending: int) -> int:
        if at > n:
            self._skip, self._pending = at - n, pending
            return -1
        return at
