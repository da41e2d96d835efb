"""A real headless Chromium for the tests, driven over the DevTools protocol with aiohttp's
websocket client (no Node, no playwright), and the second origin its pages come from.

``Chromium`` is one browser process (Debian's ``chromium``); the test learns its DevTools address
from the "DevTools listening on" line, as tests/gateway.py learns the gateway's. ``Chromium.tab``
opens a tab on a page, evaluates page JavaScript that returns a promise, and collects the
console's messages (where Chromium says why it blocked a fetch). ``PageServer`` serves
tests/voice_page.html from 127.0.0.1 on a port of its own: an origin the gateway is not.
Every wait is bounded: a browser that hangs fails the test, it never stalls the run.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

PAGE = Path(__file__).resolve().parent / "voice_page.html"
CHROMIUM = "/usr/bin/chromium"
_DEVTOOLS = re.compile(r"DevTools listening on (ws://\S+)")
# Quiet, deterministic, no traffic of its own: everything the browser does is the test's.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--mute-audio", "--autoplay-policy=no-user-gesture-required",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


class PageServer:
    """GET / is the voice page, on 127.0.0.1 (port 0: one of its own), in its own thread and event loop (so one
    instance serves a whole module whatever loop each test runs on)."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.origin = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="page-server", daemon=True)

    def start(self) -> PageServer:
        self._thread.start()
        if not self._ready.wait(10) or not self.origin:
            raise RuntimeError("page server did not start") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by start(); a thread must not die silently
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()

        async def page(request: web.Request) -> web.FileResponse:
            return web.FileResponse(PAGE, headers={"Content-Type": "text/html; charset=utf-8"})

        app = web.Application()
        app.router.add_get("/", page)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self.origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
            self._ready.set()
            await self._stopping.wait()
        finally:
            await runner.cleanup()


class Chromium:
    def __init__(self) -> None:
        self.ws_url = ""
        self.lines: list[str] = []
        self._profile = tempfile.mkdtemp(prefix="aisix-chromium-")
        self._proc: subprocess.Popen[str] | None = None
        self._drain = threading.Thread()

    def start(self, timeout: float = 30.0) -> Chromium:
        self._proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
        found = threading.Event()

        def drain() -> None:  # Chromium is chatty on stderr (dbus, ...): read all of it, always
            assert self._proc is not None and self._proc.stderr is not None
            for line in self._proc.stderr:
                self.lines.append(line)
                m = _DEVTOOLS.search(line)
                if m and not self.ws_url:
                    self.ws_url = m.group(1)
                    found.set()
            found.set()

        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()
        found.wait(timeout)
        if not self.ws_url:
            self.stop()
            raise RuntimeError("chromium did not start:\n" + "".join(self.lines[-30:]))
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None and self._proc.stderr is not None:
            self._drain.join(5)
            self._proc.stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    @asynccontextmanager
    async def tab(self, url: str, timeout: float = 30.0) -> AsyncIterator[Tab]:
        """A new tab with url loaded; closed on the way out."""
        async with asyncio.timeout(timeout), aiohttp.ClientSession() as session, \
                session.ws_connect(self.ws_url, max_msg_size=0) as ws:
            browser = _Connection(ws)
            target = (await browser.call("Target.createTarget", url="about:blank"))["targetId"]
            try:
                attached = await browser.call("Target.attachToTarget", targetId=target, flatten=True)
                tab = Tab(browser, attached["sessionId"])
                await tab.call("Log.enable")
                await tab.call("Runtime.enable")
                await tab.call("Page.enable")
                await tab.call("Page.navigate", url=url)
                await browser.event("Page.loadEventFired", tab.session)
                yield tab
            finally:
                await browser.call("Target.closeTarget", targetId=target)


class _Connection:
    """One DevTools websocket: commands answered in order, events kept until asked for."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    async def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        n = next(self._ids)
        message: dict[str, Any] = {"id": n, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self.ws.send_json(message)
        while True:
            got = await self._receive()
            if got.get("id") == n:
                if "error" in got:
                    raise RuntimeError(f"{method}: {got['error']}")
                result: dict[str, Any] = got["result"]
                return result
            self.events.append(got)

    async def event(self, method: str, session: str) -> dict[str, Any]:
        while True:
            for e in self.events:
                if e.get("method") == method and e.get("sessionId") == session:
                    self.events.remove(e)
                    return e
            self.events.append(await self._receive())

    async def _receive(self) -> dict[str, Any]:
        msg = await self.ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"DevTools connection ended: {msg.type}")
        data: dict[str, Any] = msg.json()
        return data


class Tab:
    def __init__(self, connection: _Connection, session: str) -> None:
        self.connection, self.session = connection, session

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.connection.call(method, self.session, **params)

    async def run(self, expression: str) -> Any:
        """The value of a page expression (a promise is awaited); a JavaScript exception fails."""
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise AssertionError(f"{expression}: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")

    async def wait_console(self, pattern: str) -> str:
        """The first console message matching pattern, once Chromium has logged it."""
        while True:
            found = [text for text in self.console() if re.search(pattern, text)]
            if found:
                return found[0]
            self.connection.events.append(await self.connection._receive())

    def console(self) -> list[str]:
        """What the page and Chromium logged so far (Chromium says why it blocked a fetch)."""
        texts = []
        for e in self.connection.events:
            if e.get("sessionId") != self.session:
                continue
            if e.get("method") == "Log.entryAdded":
                texts.append(e["params"]["entry"]["text"])
            elif e.get("method") == "Runtime.consoleAPICalled":
                texts.append(" ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"]))
        return texts

    async def screenshot(self, path: Path, width: int, height: int) -> None:
        await self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=False)
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


async def _screenshot(chromium: Chromium, url: str, out: Path) -> str:
    async with chromium.tab(url, timeout=60) as tab:
        state = await tab.run("""new Promise(done => { const check = () => document.body.dataset.done
                                   ? done(document.body.dataset.done) : setTimeout(check, 50); check(); })""")
        await tab.screenshot(out, 1000, 560)
    return str(state)


def main() -> None:
    """python -m tests.browser --gateway URL --key KEY [--port 8000] [--screenshot docs/browser.png]:
    serves the voice page on 127.0.0.1:PORT (list http://127.0.0.1:PORT in proxy.cors) and, with
    --screenshot, has headless Chromium run its demo against the gateway and saves what it shows."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.browser")
    parser.add_argument("--gateway", default="http://127.0.0.1:3000")
    parser.add_argument("--key", default="sk-aisix-demo")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--screenshot", type=Path)
    args = parser.parse_args()
    server = PageServer(args.port).start()
    url = f"{server.origin}/?gateway={args.gateway}&key={args.key}"
    try:
        if args.screenshot is None:
            print(f"open {url} (Ctrl-C stops)")
            threading.Event().wait()
        chromium = Chromium().start()
        try:
            state = asyncio.run(_screenshot(chromium, url, args.screenshot))
            print(f"demo {state}; wrote {args.screenshot}")
        finally:
            chromium.stop()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
