"""The framework's floor: an aiohttp app that streams the request body to the upstream with one
ClientSession and streams the answer back. No auth, no rewrite, no usage, no limits.

    python bench/bare_relay.py --listen 127.0.0.1:0 --upstream http://127.0.0.1:8080
"""

import argparse
import asyncio
import signal

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def relay(request: web.Request) -> web.StreamResponse:
    headers = {h: request.headers[h] for h in ("Content-Type", "Content-Length", "Authorization")
               if h in request.headers}
    async with request.app[SESSION].post(request.app[UPSTREAM] + request.rel_url.raw_path_qs,
                                         data=request.content, headers=headers) as up:
        answer = web.StreamResponse(status=up.status, headers={
            h: up.headers[h] for h in ("Content-Type", "Content-Length") if h in up.headers})
        await answer.prepare(request)
        async for chunk in up.content.iter_any():
            await answer.write(chunk)
        await answer.write_eof()
        return answer


async def serve(host: str, port: int, upstream: str) -> None:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.router.add_route("POST", "/{tail:.*}", relay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000), auto_decompress=False,
                                     timeout=aiohttp.ClientTimeout(total=None)) as app[SESSION]:
        await web.TCPSite(runner, host, port).start()
        address, bound = runner.addresses[0][:2]
        print(f"bare relay listening on http://{address}:{bound}", flush=True)
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
    asyncio.run(serve(host, int(port), args.upstream))
