"""FLAC: the duration STREAMINFO declares, and the frames counted as they pass.

[core] Sans-IO, a probe as aisix/audio.py describes: it keeps at most a metadata block header,
STREAMINFO's 34 bytes or the 15 first bytes of a frame header cut by a chunk boundary.

A FLAC file is ``fLaC``, metadata blocks (STREAMINFO first; the others, pictures included, are
skipped by their length) and frames. STREAMINFO gives the sample rate and the total samples:
``declared`` when that total is not 0. A FLAC written to a pipe (ffmpeg ``-f flac pipe:``, a
speech answer streamed as flac) leaves it 0, so the frames are counted too: each starts with a
header (sync ``0xFFF8``/``0xFFF9``, block size, sample rate, channels, the frame or first-sample
number in UTF-8-like coding, a CRC-8). Headers are found with ``bytes.find`` on the sync, the
audio between them is never looked at byte by byte. A header counts only when its CRC-8 holds,
it agrees with STREAMINFO (rate, channels, bits per sample) and its number follows the last one
counted (a small gap is allowed for a damaged frame): a sync pattern inside the audio data passes
all of that about once in 10^11 bytes. The duration is the last counted frame's first sample plus
its block size; when STREAMINFO declares a total too, the larger of the two (they agree on an
intact file; a header that understates the audio after it does not make the file cheaper).
"""

from __future__ import annotations

from .audio import Chunk

MAGIC = b"fLaC"
_STREAMINFO_SIZE = 34
_HEADER_MAX = 16  # a frame header's longest: 4 + 7 (number) + 2 (block size) + 2 (rate) + 1 (CRC-8)
_GAP = 64  # frames a counted header may skip past (a damaged header between two good ones)
_BAD_BLOCK = 127  # the metadata block type FLAC forbids

# Frame header codes (RFC 9639 section 9.1).
_RATES = (0, 88200, 176400, 192000, 8000, 16000, 22050, 24000, 32000, 44100, 48000, 96000)
_BITS = (0, 8, 12, 0, 16, 20, 24, 32)  # index 3 is reserved

_MAGIC, _BLOCK_HEAD, _STREAMINFO, _FRAMES = range(4)
_NEED = -1  # a header cut short by the end of the bytes at hand
_BAD = 0


def _crc8_table() -> bytes:
    table = bytearray(256)
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        table[i] = crc
    return bytes(table)


_CRC8 = _crc8_table()


def sniff(head: bytes) -> bool:
    return head.startswith(MAGIC)


class Flac:
    __slots__ = ("_block", "_bits", "_buf", "_channels", "_dead", "_fixed", "_last_meta", "_need",
                 "_nominal", "_number", "_rate", "_skip", "_start", "_state", "_tail", "_total")

    def __init__(self) -> None:
        self._state = _MAGIC
        self._need = len(MAGIC)  # bytes _buf must hold before the state can read it
        self._buf = bytearray()
        self._skip = 0  # metadata bytes still to pass over
        self._last_meta = False
        self._dead = False
        self._rate = 0
        self._channels = 0
        self._bits = 0
        self._total = 0
        self._nominal = 0  # a fixed-block-size stream's block size (all frames but the last)
        self._fixed: bool | None = None  # the blocking strategy, from the first frame counted
        self._number = -1  # the last counted frame's coded number (frame, or first sample)
        self._start = 0  # its first sample
        self._block = 0  # its block size (0: no frame counted yet)
        self._tail = b""  # the end of the last chunk, where a frame header may begin

    @property
    def declared(self) -> float | None:
        return self._total / self._rate if self._total else None

    @property
    def at_least(self) -> float:
        # The frames before the last header counted are whole; that one may still be arriving.
        return self._start / self._rate if self._rate else 0.0

    def held(self) -> int:
        """Bytes kept between feeds (for the tests: never more than STATE_LIMIT)."""
        return len(self._buf) + len(self._tail)

    def feed(self, data: Chunk) -> None:
        if self._dead:
            return
        if self._state == _FRAMES:
            self._scan(self._tail + data if self._tail else bytes(data))
            return
        view = memoryview(data).cast("B")
        pos, size = 0, len(view)
        while pos < size and not self._dead:
            if self._skip:
                step = min(self._skip, size - pos)
                self._skip -= step
                pos += step
                if not self._skip:
                    self._next_block()
                continue
            if self._state == _FRAMES:
                self._scan(bytes(view[pos:]))
                return
            piece = view[pos:pos + self._need - len(self._buf)]
            self._buf += piece
            pos += len(piece)
            if len(self._buf) == self._need:
                self._read(bytes(self._buf))
                self._buf.clear()

    def end(self) -> float | None:
        if self._dead or not self._rate:
            return None
        counted = self._start + self._block
        if not self._total and not counted:
            return None  # no frame seen and none declared: nothing to go by
        return max(self._total, counted) / self._rate

    # -- metadata ----------------------------------------------------------------------------------

    def _read(self, got: bytes) -> None:
        if self._state == _MAGIC:
            if got != MAGIC:
                self._dead = True
                return
            self._state, self._need = _BLOCK_HEAD, 4
        elif self._state == _BLOCK_HEAD:
            kind, length = got[0] & 0x7F, int.from_bytes(got[1:4], "big")
            self._last_meta = bool(got[0] & 0x80)
            first = not self._rate
            if first != (kind == 0) or kind == _BAD_BLOCK or (kind == 0 and length != _STREAMINFO_SIZE):
                self._dead = True  # STREAMINFO must come first, once, and be 34 bytes
                return
            if kind == 0:
                self._state, self._need = _STREAMINFO, _STREAMINFO_SIZE
            elif length:
                self._skip = length
            else:
                self._next_block()
        else:
            self._streaminfo(got)

    def _streaminfo(self, got: bytes) -> None:
        min_block, max_block = int.from_bytes(got[0:2], "big"), int.from_bytes(got[2:4], "big")
        packed = int.from_bytes(got[10:18], "big")  # rate:20 channels-1:3 bits-1:5 total:36
        rate = packed >> 44
        if not rate:
            self._dead = True
            return
        self._rate = rate
        self._channels = (packed >> 41 & 7) + 1
        self._bits = (packed >> 36 & 31) + 1
        self._total = packed & (1 << 36) - 1
        if min_block == max_block >= 16:
            self._nominal = max_block
        self._next_block()

    def _next_block(self) -> None:
        if self._last_meta:
            self._state = _FRAMES
        else:
            self._state, self._need = _BLOCK_HEAD, 4

    # -- frames ------------------------------------------------------------------------------------

    def _scan(self, data: bytes) -> None:
        """Count the frame headers in data; keep its end if a header may begin there."""
        self._tail = b""
        pos, size = 0, len(data)
        fixed = variable = 0  # before the first frame: where each sync is next (-1: nowhere)
        while True:
            if self._fixed is None:
                # Each found again only once passed, or a missing one makes this quadratic.
                if 0 <= fixed < pos:
                    fixed = data.find(b"\xff\xf8", pos)
                if 0 <= variable < pos:
                    variable = data.find(b"\xff\xf9", pos)
                at = fixed if variable < 0 or 0 <= fixed < variable else variable
            else:
                at = data.find(b"\xff\xf9" if not self._fixed else b"\xff\xf8", pos)
            if at < 0:
                if size > pos and data[-1] == 0xFF:
                    self._tail = data[-1:]
                return
            length = self._frame(data, at)
            if length == _NEED:
                self._tail = data[at:]  # fewer than _HEADER_MAX bytes
                return
            pos = at + (length or 1)

    def _frame(self, data: bytes, at: int) -> int:
        """The length of the frame header at data[at] if it counts (and count it), _BAD, or _NEED."""
        size = len(data)
        if at + 5 > size:
            return _NEED
        fixed = not data[at + 1] & 1
        code, rate_code = data[at + 2] >> 4, data[at + 2] & 15
        assignment, bits_code = data[at + 3] >> 4, data[at + 3] >> 1 & 7
        if (not code or rate_code == 15 or data[at + 3] & 1 or assignment > 10 or bits_code == 3
                or (assignment + 1 if assignment < 8 else 2) != self._channels
                or (bits_code and _BITS[bits_code] != self._bits)):
            return _BAD
        # The coded number: one byte 0xxxxxxx, or 11..10xxxx and as many 10xxxxxx as leading ones.
        first = data[at + 4]
        if first < 0x80:
            extra = 0
        elif 0xC0 <= first < 0xFF:
            extra = 7 - (first ^ 0xFF).bit_length()  # the leading ones, less one
            if fixed and extra > 5:
                return _BAD  # a frame number has at most 31 bits
        else:
            return _BAD
        end = at + 5 + extra + (1 if code == 6 else 2 if code == 7 else 0) \
            + (1 if rate_code == 12 else 2 if rate_code in (13, 14) else 0)
        if end + 1 > size:
            return _NEED
        number = first & (0x3F >> extra if extra else 0x7F)
        for i in range(at + 5, at + 5 + extra):
            if data[i] & 0xC0 != 0x80:
                return _BAD
            number = number << 6 | data[i] & 0x3F
        i = at + 5 + extra
        if code == 1:
            block = 192
        elif code <= 5:
            block = 576 << code - 2
        elif code == 6:
            block, i = data[i] + 1, i + 1
        elif code == 7:
            block, i = (data[i] << 8 | data[i + 1]) + 1, i + 2
        else:
            block = 256 << code - 8
        if rate_code == 12:
            rate = data[i] * 1000
        elif rate_code == 13:
            rate = data[i] << 8 | data[i + 1]
        elif rate_code == 14:
            rate = (data[i] << 8 | data[i + 1]) * 10
        else:
            rate = _RATES[rate_code] if rate_code else self._rate
        if rate != self._rate:
            return _BAD
        crc = 0
        for byte in data[at:end]:
            crc = _CRC8[crc ^ byte]
        if crc != data[end]:
            return _BAD
        if not self._count(fixed, number, block):
            return _BAD
        return end + 1 - at

    def _count(self, fixed: bool, number: int, block: int) -> bool:
        """Count a frame whose number follows the last one's (allowing a small gap)."""
        if self._fixed is not None and fixed != self._fixed:
            return False
        if fixed:
            nominal = self._nominal or block  # the first frame's, when STREAMINFO does not say
            expected, slack = self._number + 1, _GAP
            start = number * nominal
        else:
            nominal = 0
            expected, slack = self._start + self._block, _GAP * 65536
            start = number
        if not expected <= number <= expected + slack:
            return False
        if fixed and not self._nominal:
            self._nominal = nominal
        self._fixed, self._number, self._start, self._block = fixed, number, start, block
        return True
