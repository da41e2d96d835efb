"""The framework's floor for realtime sessions: an aiohttp app that accepts a WebSocket on any
path, opens one to the upstream at the same path and query with aiohttp's client, and pumps
frames both ways as they come until either side ends. No auth, no alias, no limits, no records.

It runs on uvloop, as aisix does, with the WebSocket settings aisix uses (text kept as bytes, no
compression, pings answered, 16 MiB frames), so that what aisix costs over it is aisix's own work.

    python bench/bare_ws_relay.py --listen 127.0.0.1:0 --upstream http://127.0.0.1:8080
"""

import argparse
import asyncio
import signal

import aiohttp
from aiohttp import WSMsgType, web

try:
    import uvloop
except ImportError:  # pragma: no cover (an aisix dependency: always there in its venv)
    uvloop = None

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
MAX_FRAME = 16 * 1024 * 1024
DATA = (WSMsgType.TEXT, WSMsgType.BINARY)


async def pump(src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
               dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> int:
    """Frames from src to dst until src ends; its close code (1001 when it just went)."""
    while True:
        msg = await src.receive()
        if msg.type in DATA:
            try:
                await dst.send_frame(msg.data, msg.type)
            except ConnectionError:
                return 1001
        elif msg.type is WSMsgType.CLOSE:
            return msg.data if isinstance(msg.data, int) else 1000
        else:
            return 1001


async def relay(request: web.Request) -> web.StreamResponse:
    caller = web.WebSocketResponse(autoclose=False, autoping=True, compress=False, decode_text=False,
                                   max_msg_size=MAX_FRAME)
    if not caller.can_prepare(request).ok:
        return web.Response(status=426)
    url = request.app[UPSTREAM] + request.rel_url.raw_path_qs
    try:
        upstream = await request.app[SESSION].ws_connect(url, autoclose=False, autoping=True, compress=0,
                                                         decode_text=False, max_msg_size=MAX_FRAME)
    except (aiohttp.ClientError, OSError):
        return web.Response(status=502)
    await caller.prepare(request)
    up = asyncio.create_task(pump(caller, upstream))
    down = asyncio.create_task(pump(upstream, caller))
    try:
        done, _ = await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
        code = done.pop().result()
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
    code = code if code in (1000, 1001) or 3000 <= code <= 4999 else 1000
    await asyncio.gather(upstream.close(code=code), caller.close(code=code), return_exceptions=True)
    return caller


async def serve(host: str, port: int, upstream: str) -> None:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.router.add_get("/{tail:.*}", relay)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                     cookie_jar=aiohttp.DummyCookieJar(),
                                     timeout=aiohttp.ClientTimeout(total=None)) as app[SESSION]:
        await web.TCPSite(runner, host, port, backlog=4096).start()
        bound = runner.addresses[0]
        print(f"bare ws relay listening on http://{bound[0]}:{bound[1]}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop is not None else None) as runner:
        runner.run(serve(host, int(port), args.upstream))
