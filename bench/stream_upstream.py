"""The streaming upstream for the first-byte test: POST /v1/audio/speech answers MP3 frames in
several chunks, the first at once and each next one 50 ms later, as a TTS provider streams audio.
The request body is read whole first (a real provider needs the text before it speaks).

    python bench/stream_upstream.py --listen 127.0.0.1:0 [--chunks 3] [--pause-ms 50]
"""

import argparse
import asyncio
import signal

from aiohttp import web

FRAME = bytes([0xFF, 0xF3, 0xE4, 0xC0]) + bytes(476)  # MPEG-2 layer III, 160 kbps, 24 kHz, mono
CHUNK = FRAME * 8  # 3840 bytes, 192 ms of audio
CHUNKS = web.AppKey("chunks", int)
PAUSE = web.AppKey("pause", float)


async def speech(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for i in range(request.app[CHUNKS]):
        if i:
            await asyncio.sleep(request.app[PAUSE])
        await response.write(CHUNK)
    await response.write_eof()
    return response


async def serve(host: str, port: int, chunks: int, pause: float) -> None:
    app = web.Application()
    app[CHUNKS], app[PAUSE] = chunks, pause
    app.router.add_post("/v1/audio/speech", speech)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    address, bound = runner.addresses[0][:2]
    print(f"stream upstream listening on http://{address}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--pause-ms", type=float, default=50.0)
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    asyncio.run(serve(host, int(port), args.chunks, args.pause_ms / 1000))
