"""HTTP/1.1 answers as one upstream connection parses them (aisix/http1.py), without sockets: the
bytes are fed to the protocol as the event loop would, split at every offset, and a stand-in
transport records what the connection does to the socket.

The pool's rule rests on this: a connection is reused only after an answer that ended exactly
where its framing said, to a request that was sent whole.
"""

from __future__ import annotations

import asyncio

import pytest

from aisix.http1 import HIGH_WATER, MAX_HEAD, Answer, Conn, UpstreamError


class Transport(asyncio.Transport):
    """What the connection asked of its socket."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.aborted = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def writelines(self, data: object) -> None:
        for piece in data:  # type: ignore[attr-defined]
            self.written += piece

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def connection() -> tuple[Conn, Transport, Answer, list[bool]]:
    conn, transport = Conn(), Transport()
    conn.connection_made(transport)
    ends: list[bool] = []
    answer = Answer(asyncio.get_running_loop(), conn, lambda _, reusable: ends.append(reusable))
    return conn, transport, answer, ends


async def body_of(answer: Answer) -> bytes:
    out = bytearray()
    while chunk := await answer.read():
        out += chunk
    return bytes(out)


CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nTransfer-Encoding: chunked\r\nx-request-id: up-1\r\n\r\n"
           b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world"
INTERIM = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + LENGTH


@pytest.mark.parametrize("raw", [CHUNKED, LENGTH, INTERIM], ids=["chunked", "content-length", "after-1xx"])
async def test_an_answer_split_anywhere_reads_the_same_and_frees_its_connection(raw: bytes) -> None:
    for cut in range(1, len(raw)):
        conn, transport, answer, ends = connection()
        conn.data_received(raw[:cut])
        conn.data_received(raw[cut:])
        await answer.head()
        assert answer.status == 200
        assert await body_of(answer) == b"hello world"
        answer.release()
        assert ends == [True] and not transport.aborted, cut
    assert answer.headers.getall("Transfer-Encoding", []) in ([], ["chunked"])


async def test_headers_are_kept_as_sent() -> None:
    conn, _, answer, _ = connection()
    conn.data_received(CHUNKED)
    await answer.head()
    assert (answer.headers["content-type"], answer.headers["X-Request-Id"]) == ("audio/mpeg", "up-1")


async def test_an_answer_ended_by_the_connection_is_whole_only_on_a_clean_close() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\n\r\nsome audio"
    conn, _, answer, ends = connection()
    conn.data_received(raw)
    await answer.head()
    conn.connection_lost(None)  # a FIN: the end the answer announced
    assert await body_of(answer) == b"some audio"
    answer.release()
    assert ends == [False]  # complete, but the connection is gone
    conn, _, answer, _ = connection()
    conn.data_received(raw)
    await answer.head()
    conn.connection_lost(ConnectionResetError())  # a reset is never the end of a body
    with pytest.raises(UpstreamError):
        await body_of(answer)


async def test_bytes_after_a_complete_answer_abort_the_connection() -> None:
    conn, transport, answer, _ = connection()
    conn.data_received(LENGTH + b"HTTP/1.1 200 OK\r\n")  # nobody asked for a second answer
    assert transport.aborted


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD + 1),                  # a head that never ends
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(300)) + b"\r\n",  # too many
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",  # ambiguous framing
    b"NOT HTTP\r\n\r\n",
], ids=["endless-head", "300-headers", "two-lengths", "garbage"])
async def test_what_is_not_a_sound_answer_fails_and_aborts(raw: bytes) -> None:
    conn, transport, answer, ends = connection()
    conn.data_received(raw)
    with pytest.raises(UpstreamError):
        await answer.head()
    assert transport.aborted
    answer.close()
    assert ends == [False]


async def test_an_unread_body_pauses_the_socket_past_the_high_water_mark() -> None:
    size = HIGH_WATER + 1
    conn, transport, answer, _ = connection()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    await answer.head()
    conn.data_received(b"x" * (size - 1))
    assert not transport.reading
    assert len(await answer.read()) == size - 1
    assert transport.reading
    conn.data_received(b"x")
    assert await answer.read() == b"x" and await answer.read() == b""


@pytest.mark.parametrize("extra", [b"HTTP/1.1 200 OK\r\n", b"garbage"], ids=["another-answer", "garbage"])
@pytest.mark.parametrize("raw", [LENGTH, CHUNKED, LENGTH.replace(b"OK\r\n", b"OK\r\nConnection: close\r\n", 1)],
                         ids=["content-length", "chunked", "connection-close"])
async def test_bytes_after_a_complete_answer_in_the_same_read_leave_that_answer_whole(raw: bytes, extra: bytes) -> None:
    """What follows an answer's end aborts the connection; the answer itself ended where its
    framing said and reads whole, as when those bytes come in a later read. (llhttp wraps an
    error raised in a callback in its own: the answer was failed instead, and its caller got a
    cut-short answer.)"""
    conn, transport, answer, ends = connection()
    conn.data_received(raw + extra)
    await answer.head()
    assert transport.aborted
    assert await body_of(answer) == b"hello world"
    answer.release()
    assert ends == [False]
