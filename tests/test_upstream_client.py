"""The gateway's own upstream client (aisix/upstream.py): TLS, keep-alive, the connection cap, and
answers HTTP/1.1 allows that the fault matrix in test_faults does not send.

A scripted raw upstream here reads each request whole and answers with bytes the test chose,
counting connections and the requests each one carried.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import trustme

from tests.fakes import FakeUpstream, SocketUpstream
from tests.gateway import TEAM_A, Gateway
from tests.test_faults import _read_body
from tests.test_operations import scrape, value
from tests.test_transcriptions import form

AUTH = {"Authorization": f"Bearer {TEAM_A}"}
RST = b"<reset the connection>"  # an answer ending with this is cut by an RST
SPEECH = {"model": "tts-prod", "input": "hello", "voice": "alloy"}


class Scripted(SocketUpstream):
    """An HTTP/1.1 upstream whose answers are the bytes `answer(n)` returns for the n-th request
    (from 0); it closes after an answer that says `Connection: close`, resets where one ends
    with RST. Counts connections, requests per connection and requests waiting for an answer."""

    def __init__(self, answer: Callable[[int], bytes], before_answer: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self.answer = answer
        self.before_answer = before_answer
        self.requests: list[tuple[int, str]] = []  # (connection number, path)
        self.open = 0
        self.peak_open = 0
        self._lock = threading.Lock()

    def _serve(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(30)
        f = conn.makefile("rb")
        try:
            while line := f.readline():
                headers = {}
                while (h := f.readline()) not in (b"\r\n", b""):
                    name, _, value = h.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                _read_body(f, headers)
                with self._lock:
                    n = len(self.requests)
                    self.requests.append((number, line.split()[1].decode()))
                    self.open += 1
                    self.peak_open = max(self.peak_open, self.open)
                self.before_answer()
                data = self.answer(n)
                with self._lock:
                    self.open -= 1
                if data.endswith(RST):  # what comes before it, then a reset
                    conn.sendall(data[:-len(RST)])
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                conn.sendall(data)
                if b"\r\nConnection: close\r\n" in data.split(b"\r\n\r\n")[0] + b"\r\n":
                    conn.shutdown(socket.SHUT_WR)
                    return
        except OSError:
            pass
        finally:
            conn.close()


@pytest.fixture
def scripted() -> Iterator[list[Scripted]]:
    made: list[Scripted] = []
    yield made
    for s in made:
        s.stop()


def audio(body: bytes = b"ID3-audio-bytes", extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


async def speech(gw: Gateway, n: int = 1) -> list[tuple[int, bytes, str]]:
    out = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.post(gw.url + "/v1/audio/speech", json=SPEECH, headers=AUTH) as r:
                out.append((r.status, await r.read(), r.headers["Content-Type"]))
    return out


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    pem = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(pem))
    return authority, pem


@pytest.fixture
def tls_fake(ca: tuple[trustme.CA, Path]) -> Iterator[FakeUpstream]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca[0].issue_cert("localhost").configure_cert(server)
    fake = FakeUpstream(ssl_context=server, host="localhost")
    fake.start()
    yield fake
    fake.stop()


async def test_an_https_upstream_serves_every_route(tls_fake: FakeUpstream, ca: tuple[trustme.CA, Path],
                                                     make_gateway) -> None:
    """A provider is https in production; the system's trust store decides (SSL_CERT_FILE here).
    (The fake is a fixture before make_gateway: the gateway, holding keep-alive connections to
    it, stops first.)"""
    assert tls_fake.base_url.startswith("https://localhost:")
    gw = make_gateway(upstream_base=tls_fake.base_url, env={"SSL_CERT_FILE": str(ca[1])})
    [(status, body, ctype)] = await speech(gw)
    assert (status, ctype, len(body)) == (200, "audio/mpeg", 3 * 4800)
    data, content_type = form("model", "file")
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/transcriptions", data=data,
                          headers={**AUTH, "Content-Type": content_type}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["text"] == "hello from the fake"
    got = tls_fake.wait_received(2)
    assert [g.path for g in got] == ["/v1/audio/speech", "/v1/audio/transcriptions"]
    assert got[0].headers["Host"] == f"localhost:{tls_fake.base_url.split(':')[2].split('/')[0]}"


async def test_an_upstream_certificate_nobody_trusts_is_a_502(tls_fake: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(upstream_base=tls_fake.base_url)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/speech", json=SPEECH, headers=AUTH) as r:
            assert r.status == 502
            assert (await r.json())["error"]["code"] == "upstream_unavailable"
    assert tls_fake.received == []


async def test_an_upstream_named_by_host_name(make_gateway) -> None:
    """api_base with a name, not an address: resolved (and cached) by the client, sent as Host."""
    fake = FakeUpstream(host="localhost")
    fake.start()
    try:
        gw = make_gateway(upstream_base=fake.base_url)
        assert [s for s, _, _ in await speech(gw, 3)] == [200] * 3
        port = fake.base_url.split(":")[2].split("/")[0]
        assert [g.headers["Host"] for g in fake.wait_received(3)] == [f"localhost:{port}"] * 3
        gw.stop()
    finally:
        fake.stop()


# -- keep-alive and the connection cap ------------------------------------------------------------


async def test_one_connection_carries_sequential_requests(make_gateway, scripted: list[Scripted]) -> None:
    up = Scripted(lambda n: audio(b"answer-%d" % n))
    scripted.append(up)
    gw = make_gateway(upstream_base=up.base_url)
    got = await speech(gw, 5)
    assert [b for _, b, _ in got] == [b"answer-%d" % n for n in range(5)]
    assert up.connections == 1 and [c for c, _ in up.requests] == [1] * 5


async def test_an_answer_that_ends_with_its_connection_is_whole_and_not_reused(
        make_gateway, scripted: list[Scripted]) -> None:
    """No Content-Length, not chunked: the body runs to the connection's end (RFC 9112 6.3)."""
    body = b"x" * 300_000
    up = Scripted(lambda n: b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nConnection: close\r\n\r\n" + body)
    scripted.append(up)
    gw = make_gateway(upstream_base=up.base_url)
    got = await speech(gw, 2)
    assert [(s, len(b)) for s, b, _ in got] == [(200, len(body))] * 2 and got[0][1] == body
    assert up.connections == 2


async def test_an_answer_that_ends_with_a_reset_is_cut_short_not_complete(
        make_gateway, scripted: list[Scripted]) -> None:
    """No Content-Length, not chunked, then an RST instead of a FIN: the caller must not get a
    complete answer (its chunked answer is never terminated), and the event says so."""
    up = Scripted(lambda n: b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nConnection: close\r\n\r\n"
                  + b"x" * 100_000 + RST)
    scripted.append(up)
    gw = make_gateway(upstream_base=up.base_url)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/speech", json=SPEECH,
                          headers={**AUTH, "x-aisix-request-id": "cut-by-rst"}) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    event = gw.event("cut-by-rst")
    assert (event["status"], event["error_code"]) == (200, "upstream_aborted")


async def test_interim_answers_are_skipped(make_gateway, scripted: list[Scripted]) -> None:
    up = Scripted(lambda n: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                  + audio(b"after-the-hints"))
    scripted.append(up)
    gw = make_gateway(upstream_base=up.base_url)
    assert await speech(gw, 2) == [(200, b"after-the-hints", "audio/mpeg")] * 2
    assert up.connections == 1


async def test_an_answer_head_over_64_kib_is_a_502(make_gateway, scripted: list[Scripted]) -> None:
    up = Scripted(lambda n: audio(extra="".join(f"x-pad-{i}: {'p' * 1000}\r\n" for i in range(70))))
    scripted.append(up)
    gw = make_gateway(upstream_base=up.base_url)
    [(status, body, _)] = await speech(gw)
    assert status == 502 and b"upstream_unavailable" in body


async def test_an_answer_head_that_never_ends_is_a_502_at_once(make_gateway, scripted: list[Scripted]) -> None:
    """One header value that never ends (no line break to count it by): refused once past
    64 KiB, not buffered until the answer timeout (here 60 s; the caller waits at most 10)."""
    up = Scripted(lambda n: b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nX-Endless: " + b"v" * 300_000)
    scripted.append(up)
    gw = make_gateway({"upstream": {"timeout_ms": 60_000}}, upstream_base=up.base_url)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.post(gw.url + "/v1/audio/speech", json=SPEECH, headers=AUTH) as r:
            assert r.status == 502 and (await r.json())["error"]["code"] == "upstream_unavailable"


@pytest.mark.parametrize("status", [b"000", b"099", b"600", b"999"])
async def test_a_status_outside_100_to_599_is_a_502(make_gateway, scripted: list[Scripted], status: bytes) -> None:
    """llhttp reads any three digits as a status; RFC 9110 (15) says only 100-599 are. Relayed,
    000 and 099 went out as a status line no client reads ("HTTP/1.1 0 "), recorded as a
    success with no error and, below 300, billed; 600 and 999 went out as they came."""
    up = Scripted(lambda n: b"HTTP/1.1 " + status + b" X\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 2\r\n\r\n{}")
    scripted.append(up)
    gw = make_gateway(upstream_base=up.base_url)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/speech", json=SPEECH, headers={**AUTH, "x-aisix-request-id": "odd"}) as r:
            assert r.status == 502 and (await r.json())["error"]["code"] == "upstream_unavailable"
    assert (gw.event("odd")["status"], gw.event("odd")["error_code"]) == (502, "upstream_unavailable")


@pytest.mark.parametrize("codings", [b"gzip, chunked", b"chunked, gzip", b"identity"])
async def test_an_answer_with_a_transfer_coding_besides_chunked_is_a_502(make_gateway, scripted: list[Scripted],
                                                                         codings: bytes) -> None:
    """The gateway asks for none (Accept-Encoding: identity) and cannot undo one: "gzip, chunked"
    went to the caller as gzip bytes it was never told of, the connection kept for the next."""
    up = Scripted(lambda n: b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nTransfer-Encoding: " + codings
                  + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    scripted.append(up)
    gw = make_gateway(upstream_base=up.base_url)
    [(status, body, _)] = await speech(gw)
    assert status == 502 and b"upstream_unavailable" in body


@pytest.mark.parametrize("codings", [b"gzip", b"identity, br", b"x-custom"])
async def test_an_answer_with_a_content_coding_is_a_502(make_gateway, scripted: list[Scripted],
                                                       codings: bytes) -> None:
    """Asked for none (Accept-Encoding: identity), a provider that compresses all the same had its
    bytes relayed without the Content-Encoding that says how to read them: the SDKs failed on
    them (a UnicodeDecodeError), metering and guardrails read nothing. "identity" is none."""
    up = Scripted(lambda n: b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: "
                  + codings + b"\r\nContent-Length: 5\r\n\r\nhello")
    scripted.append(up)
    gw = make_gateway(upstream_base=up.base_url)
    [(status, body, _)] = await speech(gw)
    assert status == 502 and b"upstream_unavailable" in body


async def test_an_identity_content_coding_is_none(make_gateway, scripted: list[Scripted]) -> None:
    up = Scripted(lambda n: b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nContent-Encoding: identity"
                  b"\r\nContent-Length: 5\r\n\r\nhello")
    scripted.append(up)
    gw = make_gateway(upstream_base=up.base_url)
    assert await speech(gw) == [(200, b"hello", "audio/mpeg")]


async def test_an_empty_element_in_transfer_encoding_is_no_coding(make_gateway, scripted: list[Scripted]) -> None:
    """RFC 9110 (5.6.1): a recipient accepts empty list elements; ", chunked" names no coding
    besides chunked."""
    up = Scripted(lambda n: b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nTransfer-Encoding: , chunked"
                  b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    scripted.append(up)
    gw = make_gateway(upstream_base=up.base_url)
    assert await speech(gw) == [(200, b"hello", "audio/mpeg")]


class HeldFirst:
    """Answers ``answer-<n>``, the first held (``held`` set meanwhile) until ``hold`` is set."""

    def __init__(self) -> None:
        self.hold, self.held = threading.Event(), threading.Event()

    def __call__(self, n: int) -> bytes:
        if n == 0:
            self.held.set()
            self.hold.wait(10)
        return audio(b"answer-%d" % n)


async def post(s: aiohttp.ClientSession, gw: Gateway) -> tuple[int, bytes]:
    async with s.post(gw.url + "/v1/audio/speech", json=SPEECH, headers=AUTH) as r:
        return r.status, await r.read()


async def in_flight(gw: Gateway) -> float:
    families, _ = await scrape(gw)
    return value(families["aisix_in_flight_requests"], "aisix_in_flight_requests", route="speech")


async def one_holding_one_queued(s: aiohttp.ClientSession, gw: Gateway, answers: HeldFirst
                                 ) -> tuple[asyncio.Future[tuple[int, bytes]], asyncio.Future[tuple[int, bytes]]]:
    """With max_connections 1: a first request holding the slot (its answer held upstream), and a
    second waiting for the slot in the gateway."""
    first = asyncio.ensure_future(post(s, gw))
    await asyncio.get_running_loop().run_in_executor(None, answers.held.wait, 10)
    queued = asyncio.ensure_future(post(s, gw))
    deadline = time.monotonic() + 10
    while await in_flight(gw) < 2:  # polling the gateway's own count, bounded
        assert time.monotonic() < deadline, "the second request never reached the gateway"
    return first, queued


async def test_max_connections_caps_the_requests_in_flight_upstream(make_gateway, scripted: list[Scripted]) -> None:
    """Four callers at once, a cap of two: the upstream holds each answer until a second request
    is there with it, so two do run together, and never three."""
    pair = threading.Barrier(2, timeout=10)
    up = Scripted(lambda n: audio(b"answer"), before_answer=pair.wait)
    scripted.append(up)
    gw = make_gateway({"upstream": {"max_connections": 2}}, upstream_base=up.base_url)
    async with aiohttp.ClientSession() as s:
        async def one() -> int:
            async with s.post(gw.url + "/v1/audio/speech", json=SPEECH, headers=AUTH) as r:
                await r.read()
                return r.status
        assert await asyncio.gather(*(one() for _ in range(4))) == [200] * 4
    assert up.peak_open == 2 and len(up.requests) == 4 and up.connections == 2


async def test_a_slot_comes_back_whatever_ends_the_request(make_gateway, scripted: list[Scripted]) -> None:
    """With one connection allowed, a slot that any ending failed to give back would hang every
    later request: a caller leaving while the upstream holds its answer, a caller leaving while
    it waits for the slot, an upstream that resets. Each is followed by a request that must pass."""
    answers = HeldFirst()
    up = Scripted(answers)
    scripted.append(up)
    gw = make_gateway({"upstream": {"max_connections": 1}, "metrics": {"listen": "127.0.0.1:0"}},
                      upstream_base=up.base_url)
    async with aiohttp.ClientSession() as s:
        first, queued = await one_holding_one_queued(s, gw, answers)
        deadline = time.monotonic() + 10
        queued.cancel()  # the waiting caller leaves: its place in the queue goes
        await asyncio.gather(queued, return_exceptions=True)
        while await in_flight(gw) > 1:
            assert time.monotonic() < deadline, "the gateway never saw the waiting caller leave"
        first.cancel()  # then the one holding the slot
        await asyncio.gather(first, return_exceptions=True)
        answers.hold.set()
        async with asyncio.timeout(10):  # a slot lost for good would hang here
            assert await post(s, gw) == (200, b"answer-1")  # the queued one never reached the upstream
    assert len(up.requests) == 2


async def test_a_caller_leaving_while_a_failed_answer_is_read_gives_its_slot_back(
        make_gateway, fake: FakeUpstream, scripted: list[Scripted]) -> None:
    """On an alias with two targets, the first answers 503 (an attempt to fail over from) and
    then holds its body: the gateway reads it whole before trying the second. A caller that
    leaves meanwhile must take that answer's connection down with it (aborted, its slot back):
    with one connection allowed, a slot kept by a request nobody waits for would hang every
    later request for good."""
    up = Scripted(lambda n: b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n" if n == 0 else audio(b"answer-%d" % n))
    scripted.append(up)
    gw = make_gateway(
        {"upstream": {"max_connections": 1}, "metrics": {"listen": "127.0.0.1:0"}},
        provider_keys=[{"display_name": "held", "provider": "openai", "api_base": up.base_url,
                        "api_key": "sk-provider-held"}],
        models=[{"display_name": "tts-two", "routes": ["speech"], "cooldown": {"failures": 1000000},
                 "targets": [{"provider_key": "held", "model_name": "tts-a"},
                             {"provider_key": "fake", "model_name": "tts-b", "priority": 1}]}])
    async with aiohttp.ClientSession() as s:
        async def post() -> tuple[int, bytes]:
            async with s.post(gw.url + "/v1/audio/speech", json={**SPEECH, "model": "tts-two"}, headers=AUTH) as r:
                return r.status, await r.read()

        first = asyncio.ensure_future(post())
        deadline = time.monotonic() + 10
        while True:  # the gateway has the 503's head: it is reading its body (polling its own count, bounded)
            families, _ = await scrape(gw)
            if value(families.get("aisix_upstream_attempts", []), "aisix_upstream_attempts_total", outcome="503"):
                break
            assert time.monotonic() < deadline, "the first attempt never got its answer head"
        first.cancel()  # the caller leaves
        await asyncio.gather(first, return_exceptions=True)
        async with asyncio.timeout(10):  # a slot kept for good would hang here
            assert await post() == (200, b"answer-1")
    assert [c for c, _ in up.requests] == [1, 2]  # the held connection was not reused


class AnswersEarlyThenHangsUp(SocketUpstream):
    """The first request: its head is read, not its body; a whole 413 comes back at once (no
    `Connection: close`), then a FIN, and nothing more is read until stop(). Later connections:
    a request read whole, an audio answer."""

    def __init__(self) -> None:
        super().__init__(rcvbuf=4096)
        self.answered = threading.Event()  # the first connection's 413 and FIN are out
        self.requests: list[int] = []  # the connection each whole request came on
        self._hold = threading.Event()

    def stop(self) -> None:
        self._hold.set()
        super().stop()

    def _serve(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(30)
        f = conn.makefile("rb")
        try:
            if number == 1:
                while f.readline() not in (b"\r\n", b""):
                    pass
                error = b'{"error":{"message":"too large","type":"invalid_request_error","param":null,"code":null}}'
                conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(error), error))
                conn.shutdown(socket.SHUT_WR)
                self.answered.set()
                self._hold.wait(30)  # the rest of the body is never read
                return
            while f.readline():
                headers = {}
                while (h := f.readline()) not in (b"\r\n", b""):
                    name, _, value = h.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                _read_body(f, headers)
                self.requests.append(number)
                conn.sendall(audio(b"answer"))
        except OSError:
            pass
        finally:
            conn.close()


async def test_a_connection_the_upstream_hung_up_is_not_handed_to_the_next_request(make_gateway) -> None:
    """An early answer (a whole 413, no `Connection: close`) then a FIN, while most of a large
    speech body still waits in the gateway's send buffer: the connection is closing (its close
    waits for a flush that never comes). It must not go back to the pool: the next request,
    handed it, would fail without a byte sent (502) instead of getting a new connection."""
    up = AnswersEarlyThenHangsUp()
    try:
        gw = make_gateway({"proxy": {"json_body_limit_bytes": 16 * 1024 * 1024}}, upstream_base=up.base_url)
        async with aiohttp.ClientSession() as s:
            big = json.dumps({**SPEECH, "input": "x" * (8 * 1024 * 1024)}).encode()
            async with s.post(gw.url + "/v1/audio/speech", data=io.BytesIO(big),
                              headers={**AUTH, "Content-Type": "application/json"}) as r:
                assert r.status == 413
                await r.read()
            assert await asyncio.get_running_loop().run_in_executor(None, up.answered.wait, 10)
            async with s.post(gw.url + "/v1/audio/speech", json=SPEECH, headers=AUTH) as r:
                assert (r.status, await r.read()) == (200, b"answer")
        assert up.requests == [2]
    finally:
        up.stop()


async def test_a_speech_request_waiting_for_a_connection_slot_is_not_the_callers_timeout(
        make_gateway, scripted: list[Scripted]) -> None:
    """max_connections reached: a speech request, its body read whole, waits for a slot. The wait
    was held to the alias's timeout (sent() ran before the pool's send); since the pool calls
    sent() after the write, the deadline left from reading the body (the caller's idle gap,
    stream_idle_timeout_ms) ran during the wait, and a caller that had sent everything got 408
    client_timeout, with no failover."""
    answers = HeldFirst()
    up = Scripted(answers)
    scripted.append(up)
    idle_ms = 300
    gw = make_gateway({"upstream": {"max_connections": 1, "stream_idle_timeout_ms": idle_ms, "timeout_ms": 30000},
                       "metrics": {"listen": "127.0.0.1:0"}}, upstream_base=up.base_url)
    async with aiohttp.ClientSession() as s:
        first, queued = await one_holding_one_queued(s, gw, answers)
        # Longer than the caller's idle allowance, far shorter than the upstream's timeout.
        done, _ = await asyncio.wait({queued}, timeout=4 * idle_ms / 1000)
        answers.hold.set()
        assert not done, f"the queued request ended while it waited for a slot: {queued.result()}"
        assert await first == (200, b"answer-0")
        assert await queued == (200, b"answer-1")
