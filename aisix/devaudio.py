"""Silence of a chosen length in every speech `response_format`, made in Python for the dev upstream.

[core] Pure: ``silence(fmt, seconds)`` returns a whole, valid file (ffprobe reads its duration,
ffmpeg decodes it without a complaint), 24 kHz mono like OpenAI's speech, with no encoder at run
time: WAV and PCM are zeros behind a header; MP3, AAC and Opus repeat one silent frame or packet
inside their framing (ADTS headers; Ogg pages with granule positions and CRCs); FLAC is written
out (STREAMINFO with the total samples and MD5, frames of one CONSTANT subframe, CRC-8 and
CRC-16). Each format ends on its own frame size, so the length is ``seconds`` rounded up to a
frame (24 ms MP3, 42.7 ms AAC) or exact (WAV, PCM, FLAC, and Opus, whose last granule trims).
Nothing here is meant for production.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable

RATE = 24_000  # what OpenAI's speech answers use, every format

# -- MP3 ------------------------------------------------------------------------------------------
# MPEG-2 Layer III, no CRC, 160 kbit/s, 24 kHz, mono. Header, then 476 zero bytes: all-zero side
# information (part2_3_length 0) decodes as 576 samples of silence.
MP3_HEADER = bytes((0xFF, 0xF3, 0xE4, 0xC4))
MP3_FRAME_BYTES = 72 * 160_000 // RATE  # 480
MP3_FRAME_SECONDS = 576 / RATE  # 24 ms
MP3_FRAME: bytes = MP3_HEADER + bytes(MP3_FRAME_BYTES - len(MP3_HEADER))


def mp3(seconds: float) -> bytes:
    """Whole MP3 frames covering `seconds` (at least one frame)."""
    return MP3_FRAME * max(1, math.ceil(seconds / MP3_FRAME_SECONDS - 1e-9))


# -- WAV, PCM -------------------------------------------------------------------------------------

def _samples(seconds: float, rate: int = RATE) -> int:
    return max(1, round(seconds * rate))


def pcm(seconds: float) -> bytes:
    """Headerless 16-bit little-endian mono at 24 kHz, as OpenAI's `pcm`."""
    return bytes(2 * _samples(seconds))


def wav(seconds: float) -> bytes:
    data = pcm(seconds)
    fmt = struct.pack("<HHIIHH", 1, 1, RATE, RATE * 2, 2, 16)  # PCM, mono, rate, byte rate, align, bits
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
            + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)


# -- AAC in ADTS ----------------------------------------------------------------------------------
# One AAC-LC raw_data_block of a silent mono channel, 1024 samples: copied from the frames ffmpeg's
# native encoder made once (`ffmpeg -f lavfi -i anullsrc=r=24000:cl=mono -t 1 -c:a aac -f adts`;
# every frame after the first, which carries the encoder's name, is these 4 bytes).
AAC_SILENT_BLOCK = bytes.fromhex("01182007")
AAC_FRAME_SAMPLES = 1024
_ADTS_RATE_INDEX = 6  # 24000 Hz


def _adts_header(frame_length: int) -> bytes:
    """MPEG-4, no CRC, AAC LC, 24 kHz, mono, VBR (buffer fullness 0x7FF), one raw block."""
    return bytes((0xFF, 0xF1, (1 << 6) | (_ADTS_RATE_INDEX << 2), (1 << 6) | (frame_length >> 11),
                  (frame_length >> 3) & 0xFF, ((frame_length & 7) << 5) | 0x1F, 0xFC))


def aac(seconds: float) -> bytes:
    frame = _adts_header(7 + len(AAC_SILENT_BLOCK)) + AAC_SILENT_BLOCK
    return frame * max(1, math.ceil(seconds * RATE / AAC_FRAME_SAMPLES - 1e-9))


# -- FLAC -----------------------------------------------------------------------------------------
FLAC_BLOCK = 4096
_FLAC_RATE_CODE = 0b0111  # 24 kHz in the frame header's sample-rate field


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _utf8_number(n: int) -> bytes:
    """FLAC's frame number, coded as UTF-8 codes a character (extended to 36 bits)."""
    if n < 0x80:
        return bytes((n,))
    tail = []
    while True:
        tail.append(0x80 | n & 0x3F)
        n >>= 6
        if n < 1 << (6 - len(tail)):  # what the first byte holds beside its length marker
            break
    return bytes(((0xFF << (7 - len(tail))) & 0xFF | n, *reversed(tail)))


def _flac_frame(number: int, samples: int) -> bytes:
    code = 0b1100 if samples == FLAC_BLOCK else 0b0111  # 4096, or a 16-bit (samples - 1) after
    header = bytes((0xFF, 0xF8, code << 4 | _FLAC_RATE_CODE, 0b0000_100_0)) + _utf8_number(number)
    if code == 0b0111:
        header += struct.pack(">H", samples - 1)
    header += bytes((_crc8(header),))
    frame = header + b"\x00" + b"\x00\x00"  # subframe: CONSTANT, no wasted bits; the value 0, 16 bits
    return frame + struct.pack(">H", _crc16(frame))


def flac(seconds: float) -> bytes:
    total = _samples(seconds)
    bits = (RATE << 44) | (0 << 41) | (15 << 36) | total  # rate 20, channels-1 3, bits-1 5, samples 36
    streaminfo = (struct.pack(">HH", FLAC_BLOCK, FLAC_BLOCK) + bytes(6) + bits.to_bytes(8, "big")
                  + hashlib.md5(bytes(2 * total)).digest())  # min/max frame size 0: unknown
    out = [b"fLaC", bytes((0x80, 0, 0, len(streaminfo))), streaminfo]  # last metadata block
    full, rest = divmod(total, FLAC_BLOCK)
    whole = [_flac_frame(n, FLAC_BLOCK) for n in range(full)]
    out += whole
    if rest:
        out.append(_flac_frame(full, rest))
    return b"".join(out)


# -- Opus in Ogg ----------------------------------------------------------------------------------
# A 20 ms CELT-only packet of silence: TOC 0xF8 (config 31, mono, one frame) and two bytes that
# decode to digital silence; the packet VoIP stacks send for "nothing to say".
OPUS_SILENT_PACKET = bytes((0xF8, 0xFF, 0xFE))
OPUS_PACKET_SAMPLES = 960  # at 48 kHz, Opus's granule clock
OPUS_PRE_SKIP = 312
_PACKETS_PER_PAGE = 50  # a second of audio per page
_OGG_SERIAL = 0x61697378  # "aisx"


def _ogg_crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
        table.append(crc)
    return tuple(table)


_OGG_CRC = _ogg_crc_table()


def _ogg_page(packets: list[bytes], granule: int, sequence: int, flags: int) -> bytes:
    lacing = bytearray()
    for packet in packets:  # each packet here is under 255 bytes: one lacing value (<255 ends it)
        assert len(packet) < 255
        lacing.append(len(packet))
    page = bytearray(b"OggS" + struct.pack("<BBqIIIB", 0, flags, granule, _OGG_SERIAL, sequence, 0, len(lacing))
                     + lacing + b"".join(packets))
    crc = 0
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[(crc >> 24) ^ byte]
    page[22:26] = struct.pack("<I", crc)
    return bytes(page)


def opus(seconds: float) -> bytes:
    total = _samples(seconds, 48_000)
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, OPUS_PRE_SKIP, RATE, 0, 0)
    vendor = b"aisix devupstream"
    tags = b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", 0)
    pages = [_ogg_page([head], 0, 0, 0x02), _ogg_page([tags], 0, 1, 0)]  # beginning of stream
    count = math.ceil((OPUS_PRE_SKIP + total) / OPUS_PACKET_SAMPLES)
    for first in range(0, count, _PACKETS_PER_PAGE):
        n = min(_PACKETS_PER_PAGE, count - first)
        last = first + n == count
        # The last page's granule says where the audio ends: the decoder trims the final packet.
        granule = OPUS_PRE_SKIP + total if last else (first + n) * OPUS_PACKET_SAMPLES
        pages.append(_ogg_page([OPUS_SILENT_PACKET] * n, granule, len(pages), 0x04 if last else 0))
    return b"".join(pages)


# response_format -> (Content-Type, maker)
FORMATS: dict[str, tuple[str, Callable[[float], bytes]]] = {
    "mp3": ("audio/mpeg", mp3), "opus": ("audio/ogg", opus), "aac": ("audio/aac", aac),
    "flac": ("audio/flac", flac), "wav": ("audio/wav", wav), "pcm": ("audio/pcm", pcm),
}


def silence(fmt: str, seconds: float) -> tuple[str, bytes]:
    """(Content-Type, file) of `seconds` of silence in the `response_format` fmt (KeyError if none)."""
    content_type, make = FORMATS[fmt]
    return content_type, make(seconds)
