"""The realtime bench's upstream: an aiohttp WebSocket server that plays a Realtime API provider
whose every answer is as big as what it is sent.

Any path upgrades (``/v1/realtime?model=...`` from aisix or the bare relay, or straight from the
bench). A session opens with a ``session.created`` event; every ``input_audio_buffer.append``
that comes in goes straight back as a ``response.audio.delta`` carrying the same audio, the
caller's fields (``event_id``, ``t``: the caller's send time) and ``u``, this process's
``time.perf_counter()`` when the frame arrived (CLOCK_MONOTONIC, the same clock in every process
on the machine, so the caller can split a round trip into its way up and its way down). Other
frames are read and dropped. Text stays bytes both ways (no decode, no JSON parse): the
upstream must cost as little as it can, it shares its core with the load.

    python bench/ws_upstream.py --listen 127.0.0.1:0
"""

import argparse
import asyncio
import signal
import time

from aiohttp import WSMsgType, web

try:
    import uvloop
except ImportError:  # pragma: no cover (an aisix dependency: always there in its venv)
    uvloop = None

APPEND = b'{"type":"input_audio_buffer.append",'
DELTA = b'{"type":"response.audio.delta","response_id":"resp_bench","u":%.6f,'
CREATED = (b'{"type":"session.created","event_id":"event_bench_0","session":{"object":"realtime.session",'
           b'"model":"gpt-realtime","output_modalities":["audio"]}}')
TEXT = WSMsgType.TEXT


async def session(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(autoclose=True, autoping=True, compress=False, decode_text=False,
                               max_msg_size=16 * 1024 * 1024)
    await ws.prepare(request)
    await ws.send_frame(CREATED, TEXT)
    clock, cut = time.perf_counter, len(APPEND)
    async for msg in ws:
        if msg.type is TEXT:
            data: bytes = msg.data
            if data.startswith(APPEND):
                await ws.send_frame(DELTA % clock() + data[cut:].replace(b'"audio":', b'"delta":', 1), TEXT)
    return ws


async def serve(host: str, port: int) -> None:
    app = web.Application()
    app.router.add_get("/{tail:.*}", session)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    bound = runner.addresses[0]
    print(f"ws upstream listening on http://{bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop is not None else None) as runner:
        runner.run(serve(host, int(port)))
