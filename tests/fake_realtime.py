"""A fake Realtime API upstream for the tests: an aiohttp WebSocket server on 127.0.0.1, port 0, in
its own thread (as fakes.FakeUpstream), that records every frame of every session and plays the
server events a test scripts.

Any path is served (``/v1/realtime``, Azure's ``/openai/realtime`` and ``/openai/v1/realtime``),
so a test reads the path and query the gateway chose from the record.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import multidict
import orjson
from aiohttp import WSMsgType, web

Frame = tuple[str, bytes]  # ("text" | "binary", payload)


@dataclass
class Script:
    """What the fake does in the sessions opened from now on; tests replace ``fake.script`` whole."""

    refuse: int | None = None  # answer the handshake with this HTTP status instead of upgrading
    retry_after: str | None = None  # the refusal's Retry-After
    redirect: str | None = None  # answer a handshake without ?redirected with a 302 to this URL
    on_open: list[Frame] = field(default_factory=list)  # sent as soon as the session is open
    replies: dict[str, list[Frame]] = field(default_factory=dict)  # client event type -> frames sent back
    echo: bool = False  # send every frame back as it came
    close_after_open: int | None = None  # close with this code once on_open is sent (0: a close frame without one)
    hold_handshake: bool = False  # answer no handshake (until the fake stops or the caller leaves)
    abort_after_open: bool = False  # drop the connection once on_open is sent
    flood: tuple[int, int] | None = None  # (frames, bytes each): binary frames sent as fast as allowed
    read: bool = True  # False: read nothing from the gateway until ``resume_reading()``


@dataclass
class Session:
    path: str
    query: multidict.MultiDict[str]
    headers: multidict.CIMultiDict[str]
    frames: list[Frame] = field(default_factory=list)
    close_code: int | None = None  # the code of the gateway's close frame; None until one came
    ended: bool = False
    sent: int = 0  # bytes of frames sent (flood)
    frames_sent: int = 0

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(data) for kind, data in self.frames if kind == "text"]


def text(event: dict[str, Any]) -> Frame:
    return ("text", orjson.dumps(event))


def nothing_to_cancel(event_id: str | None) -> Frame:
    """The Realtime API's error for a response.cancel with no response running; like every error
    answering a client event, it names that event's event_id."""
    return text({"type": "error", "event_id": "event_nothing", "error": {
        "type": "invalid_request_error", "code": "response_cancel_not_active", "param": None,
        "event_id": event_id, "message": "Cancellation failed: no active response found"}})


class FakeRealtime:
    def __init__(self) -> None:
        self.script = Script()
        self.sessions: list[Session] = []
        self.handshakes = 0  # handshakes that reached the fake, answered or not
        self.base_url = ""
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._reading: asyncio.Event | None = None

    def start(self) -> FakeRealtime:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="fake-realtime", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or not self.base_url:
            raise RuntimeError("fake realtime upstream did not start")
        return self

    def stop(self) -> None:
        if self._thread is not None and self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)
            self._thread = None

    def reset(self) -> None:
        self.script = Script()
        with self._cond:
            self.sessions.clear()
            self.handshakes = 0
        self.resume_reading()

    def resume_reading(self) -> None:
        if self._loop is not None and self._reading is not None:
            self._loop.call_soon_threadsafe(self._reading.set)

    def wait(self, what: Callable[[list[Session]], bool], timeout: float = 10.0) -> list[Session]:
        """Block until ``what(sessions)`` holds; the sessions then."""
        with self._cond:
            if not self._cond.wait_for(lambda: what(self.sessions), timeout):
                raise AssertionError(f"fake realtime: condition not met; sessions: {self.sessions!r}"[:2000])
            return list(self.sessions)

    async def until(self, what: Callable[[list[Session]], bool], timeout: float = 10.0) -> list[Session]:
        """wait(), from a test's event loop: that loop runs on meanwhile (a client's writes and
        closes happen in it)."""
        return await asyncio.to_thread(self.wait, what, timeout)

    def session(self, timeout: float = 10.0) -> Session:
        """The first session, once it is open."""
        return self.wait(lambda s: len(s) >= 1, timeout)[0]

    def _changed(self) -> None:
        with self._cond:
            self._cond.notify_all()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        app = web.Application()
        app.router.add_get("/{path:.*}", self._handle)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
            self._ready.set()
            await self._stopping.wait()
        finally:
            self._ready.set()
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        script = self.script
        with self._cond:
            self.handshakes += 1
            self._cond.notify_all()
        if script.hold_handshake:
            assert self._stopping is not None
            await self._stopping.wait()
        if script.refuse is not None:
            return web.json_response({"error": {"message": "refused", "type": "server_error", "param": None,
                                                 "code": None}}, status=script.refuse,
                                     headers={"Retry-After": script.retry_after} if script.retry_after else None)
        if script.redirect is not None and "redirected" not in request.query:
            raise web.HTTPFound(script.redirect)
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        ws = web.WebSocketResponse(protocols=protocols[:1], autoclose=False, max_msg_size=32 * 1024 * 1024,
                                   compress=False)
        await ws.prepare(request)
        s = Session(request.path, multidict.MultiDict(request.query), multidict.CIMultiDict(request.headers))
        with self._cond:
            self.sessions.append(s)
            self._cond.notify_all()
        assert self._reading is not None
        if not script.read:
            self._reading.clear()
        try:
            for kind, data in script.on_open:
                await (ws.send_str(data.decode()) if kind == "text" else ws.send_bytes(data))
            if script.close_after_open == 0:
                await ws.send_frame(b"", WSMsgType.CLOSE)
                await ws.receive()  # the gateway's answer to it
            elif script.close_after_open is not None:
                await ws.close(code=script.close_after_open, message=b"scripted")
            elif script.abort_after_open:
                assert request.transport is not None
                request.transport.abort()
            elif script.flood is not None:
                count, size = script.flood
                for i in range(count):
                    await ws.send_bytes(i.to_bytes(4, "big") + bytes(size - 4))
                    s.sent += size
                    s.frames_sent += 1
                    if i % 16 == 0:
                        self._changed()
                self._changed()
            while not ws.closed:
                await self._reading.wait()
                msg = await ws.receive()
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    kind = "text" if msg.type == WSMsgType.TEXT else "binary"
                    data = msg.data.encode() if kind == "text" else msg.data
                    s.frames.append((kind, data))
                    self._changed()
                    if script.echo:
                        await (ws.send_str(msg.data) if kind == "text" else ws.send_bytes(data))
                    if kind == "text":
                        event = orjson.loads(data) if data.startswith(b"{") else {}
                        event_type = event.get("type")
                        replies = script.replies.get(event_type or "")
                        if replies is None and event_type == "response.cancel":
                            # what the Realtime API answers with no response running, naming the event
                            replies = [nothing_to_cancel(event.get("event_id"))]
                        for rkind, rdata in replies or ():
                            await (ws.send_str(rdata.decode()) if rkind == "text" else ws.send_bytes(rdata))
                elif msg.type == WSMsgType.CLOSE:
                    s.close_code = msg.data
                    await ws.close(code=msg.data)
                else:
                    break
        finally:
            s.ended = True
            self._changed()
        return ws
