"""`make bench-realtime` (and the second half of `make bench`): realtime sessions through aisix
against a bare aiohttp WebSocket relay, on loopback.

Every session is a caller streaming 24 kHz 16-bit mono PCM at real-time pace: one
`input_audio_buffer.append` event of 20 ms (960 bytes, base64 in JSON) every 20 ms, answered by
the upstream (ws_upstream.py) with a `response.audio.delta` event of the same size. Each frame
carries its send time, so its round trip is measured when its answer comes back.

Three measurements, in this order:
- memory per idle session: K sessions opened and left idle, (VmRSS after - before) / K;
- capacity: the number of sessions doubled per target, then bisected, until the proxy no longer
  carries them at real-time pace (p99 round trip over every frame sent > 50 ms, a frame that never
  came back counting as late, or a session lost); the largest that passed, bare relay and aisix
  interleaved step by step;
- added delay: at half the bare relay's capacity, N sessions through the proxy interleaved with N/4
  straight to the upstream in the same run; p99(through the proxy) - p99(direct).

The proxies run pinned to core 1; the upstream and the load (a raw asyncio WebSocket client on
uvloop, in this process) on core 0. Helpers (processes, the reaper, CPU accounting, the config)
come from bench/run.py. bench/README.md, "Realtime", says what each number means.

Environment (all optional): BENCH_RT_SECONDS (3) measured per step, BENCH_RT_START (100) first
step, BENCH_RT_MAX_SESSIONS (1600), BENCH_RT_REFINE (2) bisection steps, BENCH_RT_ROUNDS (3) of
the delay test, BENCH_RT_IDLE_SESSIONS (500), BENCH_STRICT (1: exit 1 when an aim is missed).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py

SECONDS = run._env_int("BENCH_RT_SECONDS", 3)
START = run._env_int("BENCH_RT_START", 100, minimum=2)
MAX_SESSIONS = run._env_int("BENCH_RT_MAX_SESSIONS", 1600, minimum=2)
REFINE = run._env_int("BENCH_RT_REFINE", 2, minimum=0)
ROUNDS = run._env_int("BENCH_RT_ROUNDS", 3)
IDLE = run._env_int("BENCH_RT_IDLE_SESSIONS", 500)
STRICT = run.STRICT

WARMUP_S = 1.0  # every session sending, before the measured window
DRAIN_S = 1.0  # after the window, how long answers are waited for
PERIOD_S = 0.020  # one frame per session every 20 ms
PCM = b"".join(int(8000 * math.sin(2 * math.pi * 440 * i / 24000)).to_bytes(2, "little", signed=True)
               for i in range(480))  # 20 ms of 24 kHz s16 mono: 480 samples, 960 bytes (a 440 Hz tone)
AUDIO = base64.b64encode(PCM)
FRAME_HEAD = b'{"type":"input_audio_buffer.append","event_id":"evt_%d_%d","t":%.6f,"audio":"'
FRAME_TAIL = AUDIO + b'"}'
MODEL = "rt-bench"  # aisix's alias
UPSTREAM_MODEL = "gpt-realtime"
OPEN_CONCURRENCY = 64
OPEN_TIMEOUT_S = 10.0  # for a group of sessions to open, plus 10 ms per session
OPENED: dict[str, int] = {}  # sessions opened per target over the run (aisix: one usage event each)
MAX_BUFFERED = 64 * 1024  # a session whose socket holds this much unsent skips a frame (counted lost)

# "Carries at real-time pace", and the aims of the issue.
CARRY_P99_MS = 50.0
MIN_SESSIONS_VS_BARE = 0.8
MAX_ADDED_P99_MS = 5.0
MAX_IDLE_KIB = 64.0
LOAD_BOUND_CORE0 = 95.0  # % busy: the load core is saturated, the step says more about it than the proxy
LOAD_BOUND_LAG_MS = 10.0  # p99 of how late the client sent its frames (a fifth of CARRY_P99_MS)
# The direct sessions of the delay test, per session through the proxy. They only give the
# reference round trip; fewer of them keep the load core's share of the test small.
DIRECT_SHARE = 0.25

TARGETS = ("bare", "aisix")
LABEL = {"direct": "direct", "bare": "bare relay", "aisix": "aisix"}
W = 12


class Watchdog(SystemExit):
    """The whole run took longer than its bound. A SystemExit, so that the event loop lets it
    through from wherever the alarm lands (it swallows other exceptions raised in callbacks)."""


# -- the load: a raw WebSocket client --------------------------------------------------------------
# aiohttp's client costs about what the proxy under test does per frame; on one core with the
# upstream it would saturate first. This one writes each frame with one call (a zero mask key,
# which RFC 6455 allows: the payload goes as is) and parses only the send time out of answers.

@dataclass(slots=True)
class Tally:
    """What one group of sessions saw during the measured window [w0, w1)."""

    w0: float = math.inf
    w1: float = math.inf
    sent: int = 0  # frames due in the window (skipped ones included)
    skipped: int = 0  # not sent: the socket still held MAX_BUFFERED of earlier frames
    rtt: list[float] = field(default_factory=list)  # s, per frame sent in the window and back
    up: list[float] = field(default_factory=list)  # s, client send -> upstream receipt
    lag: list[float] = field(default_factory=list)  # s, how late the client sent each frame
    lost_sessions: int = 0  # closed by the other side while measuring


class Conn(asyncio.Protocol):
    __slots__ = ("sid", "tally", "transport", "buf", "opened", "ready", "gone", "seq", "closing", "accept")

    def __init__(self, sid: int, tally: Tally, accept: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.sid, self.tally, self.accept = sid, tally, accept
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.opened = False  # the 101 came
        self.ready: asyncio.Future[None] = loop.create_future()  # session.created came
        self.gone: asyncio.Future[None] = loop.create_future()  # the connection ended
        self.seq = 0
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.gone.done():
            self.gone.set_result(None)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before session.created"))
        elif not self.closing:
            self.tally.lost_sessions += 1

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.buf
        buf += data
        if not self.opened:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            del buf[:end + 4]
            if not head.startswith(b"HTTP/1.1 101") or self.accept not in head:
                self.closing = True
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(head.split(b"\r\n", 1)[0].decode("latin-1")))
                assert self.transport is not None
                self.transport.close()
                return
            self.opened = True
        while True:
            n = len(buf)
            if n < 2:
                return
            size, off = buf[1] & 0x7F, 2
            if size == 126:
                if n < 4:
                    return
                size, off = (buf[2] << 8) | buf[3], 4
            elif size == 127:
                if n < 10:
                    return
                size, off = int.from_bytes(buf[2:10], "big"), 10
            end = off + size
            if n < end:
                return
            op = buf[0] & 0x0F
            if op == 1:
                i = buf.find(b'"t":', off, end)
                if i >= 0:
                    t = float(buf[i + 4:buf.find(b",", i, end)])
                    tally = self.tally
                    if tally.w0 <= t < tally.w1:
                        tally.rtt.append(now - t)
                        u = buf.find(b'"u":', off, i)
                        if u >= 0:
                            tally.up.append(float(buf[u + 4:buf.find(b",", u, i)]) - t)
                elif not self.ready.done() and buf.find(b'"session.created"', off, end) >= 0:
                    self.ready.set_result(None)
            elif op == 8:  # close: answered by closing the connection
                assert self.transport is not None
                self.transport.close()
            elif op == 9:  # ping
                self._send(0x8A, bytes(buf[off:end]))
            del buf[:end]

    def _send(self, first: int, payload: bytes) -> None:
        n = len(payload)
        assert self.transport is not None
        if n < 126:
            self.transport.write(bytes((first, 0x80 | n)) + b"\0\0\0\0" + payload)
        else:
            self.transport.write(bytes((first, 0xFE)) + n.to_bytes(2, "big") + b"\0\0\0\0" + payload)

    def send_audio(self, due: float) -> None:
        t = time.perf_counter()
        tally = self.tally
        counted = tally.w0 <= t < tally.w1
        transport = self.transport
        assert transport is not None
        if counted:
            tally.sent += 1
            tally.lag.append(t - due)
        if transport.get_write_buffer_size() > MAX_BUFFERED or transport.is_closing():
            if counted:
                tally.skipped += 1
            return
        self.seq += 1
        self._send(0x81, FRAME_HEAD % (self.sid, self.seq, t) + FRAME_TAIL)

    async def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self._send(0x88, (1000).to_bytes(2, "big"))
        try:
            await asyncio.wait_for(asyncio.shield(self.gone), 5)
        except TimeoutError:
            if self.transport is not None:
                self.transport.abort()


@dataclass
class Target:
    name: str
    port: int
    path: str
    headers: dict[str, str]
    pid: int | None  # the proxy's process (None: straight to the upstream)


async def open_session(target: Target, sid: int, tally: Tally, timeout: float) -> Conn:
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Conn(sid, tally, accept), "127.0.0.1", target.port)
    head = [f"GET {target.path} HTTP/1.1", f"Host: 127.0.0.1:{target.port}", "Upgrade: websocket",
            "Connection: Upgrade", f"Sec-WebSocket-Key: {key.decode()}", "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in target.headers.items())]
    assert conn.transport is not None
    conn.transport.write(("\r\n".join(head) + "\r\n\r\n").encode())
    try:
        await asyncio.wait_for(asyncio.shield(conn.ready), timeout)
    except BaseException:
        conn.transport.abort()
        raise
    OPENED[target.name] = OPENED.get(target.name, 0) + 1
    return conn


async def open_many(groups: list[tuple[Target, int, Tally]]) -> tuple[list[Conn], int]:
    """Sessions for every group, interleaved (a, b, a, b, ...), opened OPEN_CONCURRENCY at a time;
    the sessions, in that order, and how many could not be opened."""
    order: list[tuple[Target, Tally]] = []
    for i in range(max(n for _, n, _ in groups)):
        order += [(t, tally) for t, n, tally in groups if i < n]
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    deadline = time.perf_counter() + OPEN_TIMEOUT_S + len(order) / 100

    async def one(sid: int, target: Target, tally: Tally) -> Conn | None:
        async with gate:
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            try:
                return await open_session(target, sid, tally, left)
            except (OSError, TimeoutError):
                return None

    conns = await asyncio.gather(*(one(i, t, tally) for i, (t, tally) in enumerate(order)))
    return [c for c in conns if c is not None], sum(c is None for c in conns)


async def close_many(conns: list[Conn]) -> None:
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


async def pace(conns: list[Conn], start: float, stop: float) -> None:
    """One frame per session every PERIOD_S, the sessions' phases spread evenly over it, until
    stop. One coroutine for all: it sleeps until the next frame is due, at least 1 ms (uvloop's
    timers have 1 ms resolution; a shorter sleep returns at once), then sends every frame that is
    due, so with many sessions frames go in small batches, each up to about a millisecond late."""
    n = len(conns)
    step = PERIOD_S / n
    clock, sleep = time.perf_counter, asyncio.sleep
    base, i = start, 0
    while True:
        due = base + i * step
        if due >= stop:
            return
        now = clock()
        if due > now:
            await sleep(max(due - now, 0.001))  # shorter ones return at once: a busy loop
            continue
        while due <= now and due < stop:
            conns[i].send_audio(due)
            i += 1
            if i == n:
                i, base = 0, base + PERIOD_S
            due = base + i * step


# -- one measured run --------------------------------------------------------------------------

@dataclass
class Step:
    target: str
    n: int
    sent: int
    back: int
    skipped: int
    p50_ms: float
    p99_ms: float  # inf: more than 1% of the frames never came back
    up_p99_ms: float
    lag_p99_ms: float
    lost_sessions: int
    not_opened: int
    proxy_cpu: float  # % of one core
    upstream_cpu: float
    client_cpu: float
    core0: float
    core1: float
    others: float
    rtt: list[float] = field(repr=False, default_factory=list)  # ms, every frame back

    @property
    def carried(self) -> bool:
        return self.p99_ms <= CARRY_P99_MS and self.lost_sessions == 0 and self.not_opened == 0

    @property
    def load_bound(self) -> bool:
        return self.core0 >= LOAD_BOUND_CORE0 or self.lag_p99_ms > LOAD_BOUND_LAG_MS

    @property
    def per_core(self) -> float:
        """Sessions one core would carry at this CPU cost per session."""
        return self.n * 100 / self.proxy_cpu if self.proxy_cpu > 0 else math.nan


def q_all(values: list[float], total: int, q: float) -> float:
    """The q-quantile of `total` samples of which `values` came back and the rest never did."""
    if total <= 0:
        return math.nan
    k = max(0, math.ceil(q * total) - 1)
    if k >= len(values):
        return math.inf
    return sorted(values)[k]


def step_of(target: Target, n: int, tally: Tally, not_opened: int, usage: tuple[float, dict[int, float], float],
            upstream_cpu: float, client_cpu: float) -> Step:
    rtt = [x * 1000 for x in tally.rtt]
    cpu, busy, others = usage
    return Step(target.name, n, tally.sent, len(rtt), tally.skipped, q_all(rtt, tally.sent, 0.5),
                q_all(rtt, tally.sent, 0.99), q_all([x * 1000 for x in tally.up], tally.sent, 0.99),
                q_all([x * 1000 for x in tally.lag], len(tally.lag), 0.99), tally.lost_sessions, not_opened,
                cpu, upstream_cpu, client_cpu, busy.get(0, 0.0), busy.get(1, 0.0), others, rtt)


async def measure(groups: list[tuple[Target, int]], upstream_pid: int, seconds: float = SECONDS) -> list[Step]:
    """Open every group's sessions (interleaved), send at real-time pace for WARMUP_S + seconds,
    wait up to DRAIN_S for the answers, close; one Step per group, over the measured window. CPU
    is counted for the first group that has a proxy."""
    tallies = [Tally() for _ in groups]
    conns, _ = await open_many([(t, n, tally) for (t, n), tally in zip(groups, tallies, strict=True)])
    opened = {id(tally): 0 for tally in tallies}
    for c in conns:
        opened[id(c.tally)] += 1
    proxy = next((t.pid for t, _ in groups if t.pid is not None), None)
    try:
        if not conns:
            raise run.BenchError(f"no session could be opened to {', '.join(t.name for t, _ in groups)}")
        start = time.perf_counter() + 0.05
        w0 = start + WARMUP_S
        w1 = w0 + seconds
        for tally in tallies:
            tally.w0, tally.w1 = w0, w1
        sender = asyncio.create_task(pace(conns, start, w1))
        gc.collect()
        gc.disable()
        try:
            await asyncio.sleep(w0 - time.perf_counter())
            usage = run.Usage([proxy] if proxy is not None else [])
            up0, me0 = run.cpu_seconds([upstream_pid]), run.cpu_seconds([os.getpid()])
            await asyncio.sleep(w1 - time.perf_counter())
            took = time.perf_counter() - usage.t
            done = usage.done()
            upstream_cpu = (run.cpu_seconds([upstream_pid]) - up0) / took * 100
            client_cpu = (run.cpu_seconds([os.getpid()]) - me0) / took * 100
            await sender
            deadline = time.perf_counter() + DRAIN_S
            while time.perf_counter() < deadline and any(len(t.rtt) + t.skipped < t.sent for t in tallies):
                await asyncio.sleep(0.02)
        finally:
            gc.enable()
            if not sender.done():
                sender.cancel()
    finally:
        await close_many(conns)
    steps = [step_of(t, n, tally, n - opened[id(tally)], done, upstream_cpu, client_cpu)
             for (t, n), tally in zip(groups, tallies, strict=True)]
    await asyncio.sleep(0.3)  # the proxies finish closing
    return steps


# -- the stack -----------------------------------------------------------------------------------

@dataclass
class Stack:
    procs: dict[str, run.Proc]
    targets: dict[str, Target]
    upstream_pid: int
    usage_file: Path


def rt_config(dir: Path, upstream: int, metrics: int) -> Path:
    """run.py's realistic config (auth, a key rate limit, budget and quota that never trip, an input
    guardrail that never matches, usage events to a file, metrics), plus a realtime alias on the ws
    upstream, priced as a realtime model is."""
    config = run.aisix_config(dir, "127.0.0.1:0", upstream, upstream, f"127.0.0.1:{metrics}")
    resources_path = dir / "resources.yaml"
    resources = json.loads(resources_path.read_text())
    resources["provider_keys"].append({"display_name": "bench-rt", "provider": "openai",
                                       "api_base": f"http://127.0.0.1:{upstream}/v1", "api_key": run.PROVIDER_KEY})
    resources["models"].append({"display_name": MODEL, "provider_key": "bench-rt", "model_name": UPSTREAM_MODEL,
                                "routes": ["realtime"],
                                "pricing": {"per_1m_input_tokens": 4.0, "per_1m_output_tokens": 16.0}})
    for key in resources["api_keys"]:
        key["allowed_models"].append("rt-*")
    resources_path.write_text(json.dumps(resources, indent=2))
    return config


def start_stack(tmp: Path) -> Stack:
    py = sys.executable
    up = run.Proc("ws upstream", [py, str(run.HERE / "ws_upstream.py"), "--listen", "127.0.0.1:0"],
                  run.LOAD_CORE, tmp / "ws_upstream.log")
    up_port = int(up.wait_for(r"listening on http://[^\s:]+:(\d+)").group(1))
    bare = run.Proc("bare ws relay", [py, str(run.HERE / "bare_ws_relay.py"), "--listen", "127.0.0.1:0",
                                      "--upstream", f"http://127.0.0.1:{up_port}"], run.PROXY_CORE,
                    tmp / "bare_ws_relay.log")
    bare_port = int(bare.wait_for(r"listening on http://[^\s:]+:(\d+)").group(1))
    config = rt_config(tmp / "aisix", up_port, run.free_port())
    aisix, aisix_port = run.start_aisix("aisix", config, run.PROXY_CORE)
    auth = {"Authorization": f"Bearer {run.API_KEY}"}
    targets = {
        "direct": Target("direct", up_port, f"/v1/realtime?model={UPSTREAM_MODEL}", {}, None),
        "bare": Target("bare", bare_port, f"/v1/realtime?model={UPSTREAM_MODEL}", {}, bare.pid),
        "aisix": Target("aisix", aisix_port, f"/v1/realtime?model={MODEL}", auth, aisix.pid),
    }
    return Stack({"upstream": up, "bare": bare, "aisix": aisix}, targets, up.pid, tmp / "aisix" / "usage.jsonl")


async def check(st: Stack) -> None:
    """A session per target: frames come back whole, with the same audio, through each."""
    for name in ("direct", "bare", "aisix"):
        tally = Tally(w0=0.0)
        conns, failed = await open_many([(st.targets[name], 1, tally)])
        if failed:
            raise run.BenchError(f"{LABEL[name]}: the session could not be opened")
        try:
            for _ in range(5):
                conns[0].send_audio(time.perf_counter())
                await asyncio.sleep(0.005)
            deadline = time.perf_counter() + 5
            while len(tally.rtt) < 5 and time.perf_counter() < deadline:
                await asyncio.sleep(0.01)
            if len(tally.rtt) < 5 or len(tally.up) < 5:
                raise run.BenchError(f"{LABEL[name]}: {len(tally.rtt)} of 5 frames came back")
        finally:
            await close_many(conns)


async def probe_echo(st: Stack) -> None:
    """The delta that comes back through aisix carries the audio that was sent."""
    import aiohttp

    url = f"ws://127.0.0.1:{st.targets['aisix'].port}{st.targets['aisix'].path}"
    async with aiohttp.ClientSession() as s, s.ws_connect(url, headers=st.targets["aisix"].headers) as ws:
        try:
            created = json.loads((await ws.receive(5)).data)
            await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "event_id": "e1", "t": 1.0,
                                          "audio": AUDIO.decode()}, separators=(",", ":")))
            back = json.loads((await ws.receive(5)).data)
        except TimeoutError:
            raise run.BenchError("aisix: no answer to an append event in 5 s") from None
        if created.get("type") != "session.created" or back.get("type") != "response.audio.delta" \
                or base64.b64decode(back.get("delta", "")) != PCM:
            raise run.BenchError(f"aisix: unexpected answers {str(created)[:200]} / {str(back)[:200]}")


# -- the measurements ---------------------------------------------------------------------------

@dataclass
class Memory:
    before_kib: int
    after_kib: int
    opened: int

    @property
    def per_session_kib(self) -> float:
        return (self.after_kib - self.before_kib) / self.opened if self.opened else math.nan


async def idle_memory(target: Target) -> Memory:
    """VmRSS of the proxy with IDLE sessions open and idle, against before they were opened. A few
    sessions first, so that what the first session of a process allocates once is not counted."""
    assert target.pid is not None
    warm, _ = await open_many([(target, 20, Tally())])
    await close_many(warm)
    await asyncio.sleep(0.5)
    before = run.status_kib(target.pid, "VmRSS")
    conns, failed = await open_many([(target, IDLE, Tally())])
    try:
        if failed:
            raise run.BenchError(f"{LABEL[target.name]}: {failed} of {IDLE} idle sessions could not be opened")
        await asyncio.sleep(0.5)
        after = run.status_kib(target.pid, "VmRSS")
    finally:
        await close_many(conns)
    await asyncio.sleep(0.3)
    return Memory(before, after, len(conns))


def step_text(s: Step) -> str:
    return (f"{s.n} sessions {LABEL[s.target]}: p99 {ms(s.p99_ms)}, back {s.back / max(1, s.sent):.1%}, "
            f"proxy cpu {s.proxy_cpu:.0f}%, core0 {s.core0:.0f}%, client lag p99 {s.lag_p99_ms:.1f} ms"
            f"{'' if s.carried else ': not carried'}")


def ms(x: float) -> str:
    return "lost" if math.isinf(x) else f"{x:.2f}"


@dataclass
class Ladder:
    steps: list[Step] = field(default_factory=list)
    best: dict[str, int] = field(default_factory=dict)  # largest carried
    worst: dict[str, int | None] = field(default_factory=dict)  # smallest not carried
    load_bound: dict[str, int | None] = field(default_factory=dict)  # a step with the load core saturated


async def capacity(st: Stack) -> Ladder:
    """Double N per target from START until it is not carried (or MAX_SESSIONS), then bisect
    REFINE times; bare relay and aisix alternate at each step."""
    lad = Ladder(best={t: 0 for t in TARGETS}, worst={t: None for t in TARGETS},
                 load_bound={t: None for t in TARGETS})
    n = {t: START for t in TARGETS}
    doubling = set(TARGETS)

    async def one(t: str, count: int) -> Step:
        s = (await measure([(st.targets[t], count)], st.upstream_pid))[0]
        lad.steps.append(s)
        run.progress(step_text(s))
        s.rtt = []  # only the delay test pools them
        if s.carried:
            lad.best[t] = max(lad.best[t], count)
        else:
            w = lad.worst[t]
            lad.worst[t] = count if w is None else min(w, count)
        if s.load_bound:  # what it says is the load's limit: no step beyond it
            lad.load_bound[t] = count
        return s

    while doubling:
        for t in TARGETS:
            if t not in doubling:
                continue
            s = await one(t, n[t])
            if not s.carried or n[t] >= MAX_SESSIONS or s.load_bound:
                doubling.discard(t)
            else:
                n[t] = min(MAX_SESSIONS, n[t] * 2)
    for _ in range(REFINE):
        for t in TARGETS:
            w = lad.worst[t]
            if w is None or lad.load_bound[t] is not None:
                continue
            mid = (lad.best[t] + w) // 2
            if w - lad.best[t] <= max(10, lad.best[t] // 20):
                continue
            await one(t, mid)
    return lad


async def delay(st: Stack, n: int, k: int) -> dict[str, list[tuple[Step, Step]]]:
    """ROUNDS rounds; in each, for each proxy (order alternating), n sessions through it
    interleaved with k straight to the upstream. (proxy step, direct step) per round."""
    out: dict[str, list[tuple[Step, Step]]] = {t: [] for t in TARGETS}
    for r in range(ROUNDS):
        for t in (TARGETS if r % 2 == 0 else TARGETS[::-1]):
            proxied, direct = await measure([(st.targets[t], n), (st.targets["direct"], k)], st.upstream_pid)
            out[t].append((proxied, direct))
            run.progress(f"round {r + 1}/{ROUNDS} delay, {n} + {k} sessions: {LABEL[t]} p99 {ms(proxied.p99_ms)} ms, "
                         f"direct p99 {ms(direct.p99_ms)} ms, core0 {proxied.core0:.0f}%")
    return out


def pooled(steps: list[Step], q: float) -> float:
    return q_all([x for s in steps for x in s.rtt], sum(s.sent for s in steps), q)


# -- main -----------------------------------------------------------------------------------------

def budget() -> int:
    ladder = (math.ceil(math.log2(MAX_SESSIONS / START)) + 1 + REFINE) * len(TARGETS)
    per_step = WARMUP_S + SECONDS + DRAIN_S + 6 + MAX_SESSIONS / 200  # opening and closing, bounded
    return int(ladder * per_step + ROUNDS * len(TARGETS) * (WARMUP_S + SECONDS + DRAIN_S + 8)
               + 2 * (IDLE / 50 + 10) + 60)


def main() -> int:
    if run.HAVE_TWO_CORES:
        os.sched_setaffinity(0, run.LOAD_CORE)  # this process is the load
        if run.find_tool("taskset") is None:
            print("bench: missing taskset (util-linux)", file=sys.stderr)
            return 2
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    return run.harness("aisix-bench-rt-", budget(), measure_and_report)


def measure_and_report(tmp: Path) -> int:
    started = time.monotonic()
    print(f"aisix realtime benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"machine: {run.machine()}")
    print(f"software: {versions()}")
    if run.HAVE_TWO_CORES:
        print("layout: aisix and the bare ws relay pinned to core 1; the ws upstream and this client "
              "(raw asyncio WebSocket, uvloop) on core 0")
    else:
        print("layout: fewer than 2 cores available: nothing is pinned, figures are rough")
    before = run.Usage([])
    time.sleep(1)
    _, busy, others = before.done()
    print(f"load before start: {others:.0f}% of a core in other processes "
          f"({', '.join(f'core{c} {b:.0f}%' for c, b in sorted(busy.items()))} busy)")
    run.progress(f"starting the stack in {tmp}")
    st = start_stack(tmp)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(measure_all(st, started))


def versions() -> str:
    import aiohttp

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(run.ROOT), *args], capture_output=True, text=True, timeout=10)
        return r.stdout.strip()

    rev, dirty = git("rev-parse", "--short", "HEAD") or "?", git("status", "--porcelain", "--", "aisix")
    return (f"Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, uvloop {uvloop.__version__}, "
            f"aisix at {rev}{' + uncommitted changes in aisix/' if dirty else ''}")


async def measure_all(st: Stack, started: float) -> int:
    await check(st)
    await probe_echo(st)
    frame = len(FRAME_HEAD % (1, 1, time.perf_counter()) + FRAME_TAIL)
    print(f"aisix: auth (api key), alias {MODEL} (routes: realtime, priced) on the ws upstream, key rate limit "
          "rpm 100000000, budget and quota that never trip, input guardrail (never matches), usage events to a "
          "file, access log on, metrics on")
    print(f"session: 24 kHz s16 mono PCM in 20 ms frames ({len(PCM)} bytes; a {frame}-byte "
          "input_audio_buffer.append text event), one every 20 ms per session, phases spread evenly; the "
          "upstream answers each with a response.audio.delta of about the same size")
    print(f"carried: p99 round trip <= {CARRY_P99_MS:g} ms over every frame sent in the measured window "
          "(a frame not back counts as late), no session lost or refused")

    run.progress(f"memory: {IDLE} idle sessions per proxy")
    mem = {t: await idle_memory(st.targets[t]) for t in TARGETS}
    print(f"\nmemory per idle session: {IDLE} sessions opened (session.created received), nothing sent")
    print(f"  {'':<{W}}{'VmRSS before':>14}{'with them':>12}{'per session':>14}")
    for t in TARGETS:
        m = mem[t]
        print(f"  {LABEL[t]:<{W}}{m.before_kib / 1024:>10.1f} MiB{m.after_kib / 1024:>8.1f} MiB"
              f"{m.per_session_kib:>10.1f} KiB")

    run.progress(f"capacity: from {START} sessions, doubling up to {MAX_SESSIONS}, then {REFINE} bisection steps")
    lad = await capacity(st)
    print(f"\ncapacity: sessions doubled from {START} (at most {MAX_SESSIONS}), then bisected {REFINE} times; "
          f"each step {WARMUP_S:g} s warm-up + {SECONDS} s measured; bare relay and aisix alternate")
    print(f"  {'':<{W}}{'sessions':>8}{'frames/s':>9}{'back':>8}{'p50 ms':>8}{'p99 ms':>8}{'up p99':>8}"
          f"{'proxy cpu':>10}{'sess/core':>10}{'client':>8}{'upstream':>9}{'lag p99':>8}{'core0':>6}{'core1':>6}"
          f"{'others':>7}  carried")
    for t in TARGETS:
        for s in sorted((s for s in lad.steps if s.target == t), key=lambda s: s.n):
            print(f"  {LABEL[t]:<{W}}{s.n:>8,}{s.n / PERIOD_S:>9,.0f}{s.back / max(1, s.sent):>8.1%}{ms(s.p50_ms):>8}"
                  f"{ms(s.p99_ms):>8}{ms(s.up_p99_ms):>8}{s.proxy_cpu:>9.0f}%{s.per_core:>10,.0f}{s.client_cpu:>7.0f}%"
                  f"{s.upstream_cpu:>8.0f}%{s.lag_p99_ms:>8.1f}{s.core0:>5.0f}%{s.core1:>5.0f}%{s.others:>6.0f}%  "
                  f"{'yes' if s.carried else 'NO'}{' (load-bound)' if s.load_bound else ''}"
                  f"{' (noisy)' if s.others > run.NOISY else ''}")
    best = lad.best
    for t in TARGETS:
        note = ""
        if lad.load_bound[t] is not None:
            note = f" (at {lad.load_bound[t]} the load core was saturated, so the ramp stopped: a lower bound)"
        elif lad.worst[t] is None:
            note = f" (every step carried, up to BENCH_RT_MAX_SESSIONS={MAX_SESSIONS}: a lower bound)"
        print(f"  most sessions carried, {LABEL[t]}: {best[t]:,}{note}")
    carried_ratio = run.ratio(best["aisix"], best["bare"])
    # CPU per session, compared at one count (per-frame costs fall as load rises): the largest both
    # carried with the load core not saturated, else the largest both ran
    def counts(t: str, valid: bool) -> set[int]:
        return {s.n for s in lad.steps if s.target == t and (not valid or (s.carried and not s.load_bound))}

    common = max(counts("bare", True) & counts("aisix", True), default=0) \
        or max(counts("bare", False) & counts("aisix", False), default=0)
    found = all(lad.worst[t] is not None and lad.load_bound[t] is None for t in TARGETS)
    print(f"  aisix/bare relay: {carried_ratio:.2f}x sessions carried"
          f"{'' if found else ' (not both limits found: see above)'}")
    # One 3 s step per target is one sample (its CPU share moved by a fifth between runs here):
    # the ladder's step and ROUNDS more at that count, interleaved, and the medians.
    samples = {t: [s.per_core for s in lad.steps if s.target == t and s.n == common] for t in TARGETS}
    for r in range(ROUNDS if common else 0):
        for t in (TARGETS if r % 2 else TARGETS[::-1]):
            s = (await measure([(st.targets[t], common)], st.upstream_pid))[0]
            run.progress(f"round {r + 1}/{ROUNDS} CPU at {common} sessions, {step_text(s)}")
            samples[t].append(s.per_core)
    per_core = {t: run.med(v) if v else math.nan for t, v in samples.items()}
    cpu_ratio = run.ratio(per_core["aisix"], per_core["bare"])
    print(f"  by CPU at {common:,} sessions (sessions x 100% / proxy cpu, median of {len(samples['aisix'])} "
          f"interleaved runs): bare relay {per_core['bare']:,.0f} ({', '.join(f'{x:,.0f}' for x in samples['bare'])}), "
          f"aisix {per_core['aisix']:,.0f} ({', '.join(f'{x:,.0f}' for x in samples['aisix'])}) sessions per core: "
          f"{cpu_ratio:.2f}x")
    cap_ratio, cap_how = (carried_ratio, f"sessions carried, {best['aisix']:,} vs {best['bare']:,}") if found \
        else (cpu_ratio, f"by CPU at {common:,} sessions, as the ramp did not find both limits")

    half = max(2, best["bare"] // 2)
    k = max(2, round(half * DIRECT_SHARE))
    run.progress(f"delay: {half} sessions through each proxy, interleaved with {k} direct, {ROUNDS} rounds")
    d = await delay(st, half, k)
    print(f"\nadded delay at half the bare relay's capacity: {half} sessions through the proxy interleaved with "
          f"{k} straight to the upstream, in the same run; {ROUNDS} rounds x {SECONDS} s; round trips of "
          "every frame of the rounds pooled")
    print(f"  {'':<{W}}{'p50 ms':>8}{'p99 ms':>8}{'direct p50':>11}{'direct p99':>11}{'added p50':>10}"
          f"{'added p99':>10}  {'p99 per round (proxy - direct)':<34}{'proxy cpu':>9}{'core0':>6}")
    added: dict[str, float] = {}
    for t in TARGETS:
        proxied = [p for p, _ in d[t]]
        direct = [q for _, q in d[t]]
        p50, p99, d50, d99 = pooled(proxied, 0.5), pooled(proxied, 0.99), pooled(direct, 0.5), pooled(direct, 0.99)
        added[t] = p99 - d99
        per_round = " ".join(f"{p.p99_ms - q.p99_ms:+.2f}" for p, q in d[t])
        print(f"  {LABEL[t]:<{W}}{ms(p50):>8}{ms(p99):>8}{ms(d50):>11}{ms(d99):>11}{p50 - d50:>+10.2f}"
              f"{added[t]:>+10.2f}  "
              f"{per_round:<34}{run.med([p.proxy_cpu for p in proxied]):>8.0f}%"
              f"{run.med([p.core0 for p in proxied]):>5.0f}%")

    load_bound = [s for s in lad.steps if s.load_bound] + [p for t in TARGETS for p, _ in d[t] if p.load_bound]
    noise = run.med([s.others for s in lad.steps])
    checks = [
        (cap_ratio >= MIN_SESSIONS_VS_BARE,
         f"realtime sessions per core >= {MIN_SESSIONS_VS_BARE}x bare relay: {cap_ratio:.2f}x ({cap_how})"),
        (added["aisix"] <= MAX_ADDED_P99_MS,
         f"realtime p99 added delay at {half} sessions <= {MAX_ADDED_P99_MS:g} ms: {added['aisix']:+.2f} ms "
         f"(bare relay {added['bare']:+.2f} ms)"),
        (mem["aisix"].per_session_kib < MAX_IDLE_KIB,
         f"memory per idle realtime session < {MAX_IDLE_KIB:g} KiB: {mem['aisix'].per_session_kib:.1f} KiB "
         f"(bare relay {mem['bare'].per_session_kib:.1f} KiB)"),
    ]
    print("\nsummary (realtime targets of issue 15)")
    for ok, text in checks:
        print(f"  {run.verdict(ok)}  {text}")
    print(f"  {'ok  ' if not load_bound else 'WARN'}  load core saturated (>= {LOAD_BOUND_CORE0:g}% busy, or the "
          f"client late by > {LOAD_BOUND_LAG_MS:g} ms p99) in {len(load_bound)} of {len(lad.steps) + 2 * ROUNDS} runs"
          f"{': those figures bound the load, not the proxy' if load_bound else ''}")
    print(f"  {'ok  ' if noise <= run.NOISY else 'WARN'}  other load on the machine during the capacity steps: "
          f"{noise:.0f}% of a core (median){'' if noise <= run.NOISY else ': the figures are noisy'}")
    events, want = 0, OPENED.get("aisix", 0)
    for _ in range(20):  # the usage sink writes in the background
        events = sum(1 for _ in st.usage_file.open()) if st.usage_file.exists() else 0
        if events >= want:
            break
        await asyncio.sleep(0.1)
    print(f"  {'ok  ' if events >= want else 'WARN'}  aisix usage events: {events:,} for {want:,} sessions opened "
          "through it (one each)")
    print(f"\ntook {time.monotonic() - started:.0f} s")
    return 1 if STRICT and not all(ok for ok, _ in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
