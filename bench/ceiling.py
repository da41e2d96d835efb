"""The ceiling of any aiohttp proxy: an aiohttp app (uvloop, no access log) that answers the bench's
routes itself, with no upstream at all. Speech reads the JSON body and answers the same 64 KiB of
MP3 frames as the nginx upstream; the multipart routes read the whole body (streamed, discarded)
and answer the same JSON transcript. A proxy built on aiohttp does all of this and more (an upstream
request and its answer on top), so it cannot be faster.

    python bench/ceiling.py --listen 127.0.0.1:0 --speech FILE --transcript FILE
"""

import argparse
import asyncio
import signal
from pathlib import Path

import uvloop
from aiohttp import web

SPEECH = web.AppKey("speech", bytes)
TRANSCRIPT = web.AppKey("transcript", bytes)


async def speech(request: web.Request) -> web.Response:
    await request.json()
    return web.Response(body=request.app[SPEECH], content_type="audio/mpeg")


async def transcribe(request: web.Request) -> web.Response:
    while await request.content.readany():  # streamed and dropped, as a proxy streams it on
        pass
    return web.Response(body=request.app[TRANSCRIPT], content_type="application/json")


async def serve(host: str, port: int, speech_bytes: bytes, transcript: bytes) -> None:
    app = web.Application()
    app[SPEECH], app[TRANSCRIPT] = speech_bytes, transcript
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_post("/v1/audio/transcriptions", transcribe)
    app.router.add_post("/v1/audio/translations", transcribe)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    address, bound = runner.addresses[0][:2]
    print(f"aiohttp ceiling listening on http://{address}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--speech", type=Path, required=True, help="the speech answer (the nginx upstream's file)")
    parser.add_argument("--transcript", type=Path, required=True, help="the transcription answer")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    uvloop.run(serve(host, int(port), args.speech.read_bytes(), args.transcript.read_bytes()))
