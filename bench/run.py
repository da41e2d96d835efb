"""`make bench`: aisix against references that show the real limit, on loopback, printed as ratios.

Starts everything it needs in a temporary directory (a fast nginx upstream, a streaming upstream,
and on the proxy core: nginx tuned as the reference proxy, the aiohttp ceiling (bench/ceiling.py,
no upstream at all), the raw relay (bench/raw_relay.py, no framework), the bare aiohttp relay,
aisix), measures in interleaved rounds, prints one table per route with aisix's ratio to each
reference, the first-byte, big-upload, failover-cost and one-vs-two-process figures, then a
PASS/FAIL line per target of the issues (12-14 against the bare relay, 18 against tuned nginx and
the ceiling). aisix is measured twice in each table: through a plain alias, and through a failover
alias (two healthy targets, so uploads are copied for a replay).
Every process it started is stopped and the directory removed on exit, on Ctrl-C, SIGTERM and on
error (and by a reaper process if this one is killed outright).
bench/README.md says what each number means.

Environment (all optional): BENCH_SECONDS (5) per wrk run, BENCH_ROUNDS (3), BENCH_CONNECTIONS
(64), BENCH_ROUTES (speech,transcription; add translation), BENCH_FIRST_BYTE_REQUESTS (200),
BENCH_UPLOAD_MIB (512), BENCH_STRICT (1: exit 1 when a target fails).

Standard library and aiohttp only here (aiohttp just for its version string; the references run as
their own processes, on aiohttp, httptools and uvloop, all aisix's dependencies); wrk and nginx
from Debian.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import grp
import hashlib
import json
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        sys.exit(f"bench: {name} must be an integer, got {raw!r}")
    if value < minimum:
        sys.exit(f"bench: {name} must be >= {minimum}")
    return value


SECONDS = _env_int("BENCH_SECONDS", 5)
ROUNDS = _env_int("BENCH_ROUNDS", 3)
CONNECTIONS = _env_int("BENCH_CONNECTIONS", 64)
FIRST_BYTE_N = _env_int("BENCH_FIRST_BYTE_REQUESTS", 200)
UPLOAD_MIB = _env_int("BENCH_UPLOAD_MIB", 512)
STRICT = os.environ.get("BENCH_STRICT", "") == "1"
ROUTES = [r.strip() for r in os.environ.get("BENCH_ROUTES", "speech,transcription,transcription-mp3").split(",")
          if r.strip()]

API_KEY = "sk-bench-caller-0123456789"
PROVIDER_KEY = "sk-bench-provider-0123456789"
SPEECH_BYTES = 64 * 1024
FILE_KIB = 256
WARMUP_SECONDS = 1
STREAM_CHUNKS, STREAM_PAUSE_MS = 3, 50
TRANSCRIPT = (b'{"text":"The quick brown fox jumps over the lazy dog.","usage":{"type":"tokens",'
              b'"input_tokens":10,"output_tokens":5,"total_tokens":15}}')
MP3_FRAME = bytes([0xFF, 0xF3, 0xE4, 0xC0]) + bytes(476)  # MPEG-2 layer III, 160 kbps, 24 kHz, mono

ROUTE_INFO = {  # name -> (path, wrk script, what is sent)
    "speech": ("/v1/audio/speech", "speech.lua", "JSON, 64 KiB MP3 answer"),
    "transcription": ("/v1/audio/transcriptions", "transcription.lua",
                      f"{FILE_KIB} KiB multipart upload, model before file, small JSON answer"),
    "translation": ("/v1/audio/translations", "translation.lua",
                    f"{FILE_KIB} KiB multipart upload, model before file, small JSON answer"),
    "transcription-mp3": ("/v1/audio/transcriptions", "transcription.lua",
                          f"the same upload, the file {FILE_KIB} KiB of a real MP3 (44.1 kHz, 128 kb/s CBR, "
                          "ffmpeg): aisix's duration probe walks every frame, as for a real upload"),
}
REAL_MP3_PATH = Path("bench.mp3")  # made by ffmpeg in the bench's directory (start_stack)
TARGETS = ("direct", "nginx", "ceiling", "raw", "bare", "aisix", "failover")
LABEL = {"direct": "no proxy", "nginx": "nginx tuned", "ceiling": "aiohttp ceiling", "raw": "raw relay",
         "bare": "bare relay", "aisix": "aisix", "failover": "aisix failover"}
# What aisix is compared with in each route's table, in the order printed: the limits (tuned nginx,
# aiohttp with no upstream at all, a Python relay without a framework), then the aiohttp relay.
REFERENCES = ("nginx", "ceiling", "raw", "bare")
# The aliases each target is sent (speech, multipart routes). "failover" is the same aisix process
# as "aisix", through an alias with two healthy targets: the happy path with the replay copy on.
MODELS = {"failover": ("tts-failover", "whisper-failover")}
PLAIN_MODELS = ("tts-bench", "whisper-bench")
# An alias whose first target (priority 0) always answers 503 at once, then the plain target.
AFTER_503_MODELS = ("tts-after-503", "whisper-after-503")
W = 17  # width of the target column

# Thresholds of issues 12, 13 and 14 (against the bare relay; first byte and uploads against nginx).
MIN_RPS_VS_BARE = 0.8
MAX_P99_VS_BARE = 1.5
MAX_FIRST_BYTE_ADDED_MS = 2.0
MIN_UPLOAD_VS_NGINX = 0.5
MAX_RSS_GROWTH_MIB = 16.0
# Thresholds of issue 18 (against the real limits: tuned nginx and the aiohttp ceiling).
MIN_RPS_VS_NGINX = 0.4
MIN_RPS_VS_CEILING = 0.5
MAX_P99_VS_NGINX = 3.0
MAX_FIRST_BYTE_ADDED_MS_18 = 0.3
MIN_UPLOAD_VS_NGINX_18 = 1.0
NOISY = 10.0  # % of a core used by other work during a run, above which the output warns


class BenchError(Exception):
    """A setup or measurement failure: the run stops, cleans up and says why."""


class Watchdog(BaseException):
    """The whole run took longer than its bound."""


def harness(prefix: str, bound: int, body: Callable[[Path], int]) -> int:
    """A bench's run: body(tmp) with a temp directory (in /dev/shm when it can be), stopped by
    SIGTERM/SIGHUP, Ctrl-C or its time bound, its setup errors said in one line, and every process
    it started stopped and its directory removed however it ends (the Reaper too, should this
    process be killed). The exit code: body's, 2 (an error or the bound), 130 (interrupted)."""
    def stop(signum: int, _frame: object) -> None:
        print(f"\nbench: stopped by signal {signum}", file=sys.stderr)
        raise SystemExit(128 + signum)

    fired = False

    def watchdog(_signum: int, _frame: object) -> None:
        nonlocal fired
        if fired:
            print("\nbench: still not stopped 30 s after the time bound; the reaper cleans up", file=sys.stderr)
            os._exit(2)
        fired = True
        signal.alarm(30)
        raise Watchdog()

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(bound)
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    Reaper.start(tmp)
    try:
        return body(tmp)
    except BenchError as e:
        print(f"\nbench: {e}", file=sys.stderr)
        return 2
    except Watchdog:
        print(f"\nbench: stopped after {bound} s (the run's time bound)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.alarm(0)
        Proc.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        Reaper.done()


# -- processes ------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the bench process dies, however it dies."""
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# If this process is killed outright (SIGKILL), PR_SET_PDEATHSIG takes its children with it, but
# not nginx's workers (a fork of a child does not inherit it). The reaper, a process of its own,
# holds the other end of a pipe: when this process ends without saying "done", it kills the
# process groups it was told about and removes the temporary directory.
_REAPER_CODE = """
import os, shutil, signal, sys
groups = set()
for line in sys.stdin:
    word = line.strip()
    if word == "done":
        sys.exit(0)
    if word.startswith("-"):
        groups.discard(int(word[1:]))
    elif word:
        groups.add(int(word))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


class Reaper:
    proc: subprocess.Popen[str] | None = None

    @classmethod
    def start(cls, tmp: Path) -> None:
        cls.proc = subprocess.Popen([sys.executable, "-c", _REAPER_CODE, str(tmp)], stdin=subprocess.PIPE,
                                    text=True, start_new_session=True)

    @classmethod
    def tell(cls, word: str) -> None:
        if cls.proc is not None and cls.proc.stdin is not None:
            with contextlib.suppress(OSError):
                cls.proc.stdin.write(word + "\n")
                cls.proc.stdin.flush()

    @classmethod
    def done(cls) -> None:
        if cls.proc is not None:
            cls.tell("done")
            with contextlib.suppress(OSError):
                cls.proc.stdin.close()  # type: ignore[union-attr]
            with contextlib.suppress(subprocess.TimeoutExpired):
                cls.proc.wait(5)
            cls.proc = None


def cpu_list(cores: set[int] | None) -> list[str]:
    if cores is None or not HAVE_TWO_CORES:
        return []
    return ["taskset", "-c", ",".join(map(str, sorted(cores)))]


class Proc:
    """A child process in its own process group (its workers too), stopped by the bench on exit."""

    running: ClassVar[list[Proc]] = []

    def __init__(self, name: str, argv: list[str], cores: set[int] | None, log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log
        # The last lines only: aisix's access log is one line per request, millions in a run.
        self.lines: collections.deque[str] = collections.deque(maxlen=2000)
        self._seen = threading.Condition()
        self.proc = subprocess.Popen(
            [*cpu_list(cores), *argv], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        Proc.running.append(self)
        Reaper.tell(str(self.proc.pid))  # its process group, named by its pid
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "a") as log:
            for line in self.proc.stdout:
                log.write(line)
                with self._seen:
                    self.lines.append(line)
                    self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """The first output line matching pattern; BenchError if the process ends or time runs out."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for line in self.lines:
                    if m := regex.search(line):
                        return m
                left = deadline - time.monotonic()
                if self.proc.poll() is not None or left <= 0:
                    raise BenchError(f"{self.name} did not start ({self.why()}):\n{self.tail()}")
                self._seen.wait(min(left, 0.2))

    def why(self) -> str:
        code = self.proc.poll()
        return "still running" if code is None else f"exit status {code}"

    def tail(self, n: int = 20) -> str:
        return "".join(list(self.lines)[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group: nginx's workers go too
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._drain.join(5)
        Reaper.tell(f"-{self.proc.pid}")
        if self in Proc.running:
            Proc.running.remove(self)

    def children(self) -> list[int]:
        """Direct children (nginx's workers)."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    @classmethod
    def stop_all(cls) -> None:
        for p in reversed(list(cls.running)):
            with contextlib.suppress(Exception):
                p.stop(grace=5.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: Proc, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            break
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # bounded by the deadline
    raise BenchError(f"{proc.name} is not listening on {port} ({proc.why()}):\n{proc.tail()}")


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def core_times() -> dict[int, tuple[int, int, int]]:
    """Per core, in clock ticks: (busy, busy in processes + steal, total), from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+) (.*)", line)
        if m:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in m.group(2).split()[:8])
            out[int(m.group(1))] = (user + nice + system + irq + softirq + steal,
                                    user + nice + system + steal,
                                    user + nice + system + idle + iowait + irq + softirq + steal)
    return out


class Usage:
    """CPU use over an interval: the watched processes, each core, and everything that is not this
    benchmark (other work on the machine, or the hypervisor's steal), in % of one core."""

    def __init__(self, watch: list[int]) -> None:
        self.watch = watch
        self.t = time.monotonic()
        self.cpu = cpu_seconds(watch)
        self.ours = _ours()
        self.cores = core_times()

    def done(self) -> tuple[float, dict[int, float], float]:
        elapsed = max(1e-6, time.monotonic() - self.t)
        cores = core_times()
        busy = {c: 100 * (cores[c][0] - self.cores[c][0]) / max(1, cores[c][2] - self.cores[c][2])
                for c in cores if c in self.cores}
        tick = os.sysconf("SC_CLK_TCK")
        process_time = sum(cores[c][1] - self.cores[c][1] for c in cores if c in self.cores) / tick
        others = max(0.0, process_time - (_ours() - self.ours)) / elapsed * 100
        return (cpu_seconds(self.watch) - self.cpu) / elapsed * 100, busy, others


def _ours() -> float:
    """CPU seconds of this process, every process it started and still runs, and reaped children
    (wrk)."""
    pids = [os.getpid()]
    for p in Proc.running:
        pids += [p.pid, *p.children()]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return cpu_seconds(pids) + children.ru_utime + children.ru_stime


def status_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise BenchError(f"{name} not in /proc/{pid}/status")


def find_tool(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin")


HAVE_TWO_CORES = len(os.sched_getaffinity(0)) >= 2 and {0, 1} <= os.sched_getaffinity(0)
LOAD_CORE, PROXY_CORE = {0}, {1}


# -- the stack ------------------------------------------------------------------------------------

NGINX_COMMON = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    client_max_body_size 0;
{body}
}}
"""

# The fast upstream. nginx refuses POST on a static file with 405; `error_page 405 =200` turns that
# into the file. For the multipart routes, `mirror_request_body on` makes nginx read the whole
# body before the content phase (`return` would answer at once and discard the body in the
# background, so a proxy would see the answer before its upload had gone through); the body is
# kept in memory up to client_body_buffer_size, in a temp file (in the bench's directory) beyond.
UPSTREAM_BODY = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {dir}/root;
        etag off;
        client_body_buffer_size 1m;
        location = /v1/audio/speech {{
            default_type audio/mpeg;
            error_page 405 =200 $uri;
        }}
        location ~ ^/v1/audio/(transcriptions|translations)$ {{
            mirror /_sink;
            mirror_request_body on;
            error_page 405 =200 /_transcript;
        }}
        location = /_transcript {{ internal; default_type application/json; }}
        location = /_sink {{ internal; return 204; }}
        location ^~ /down/ {{
            default_type application/json;
            return 503 '{{"error":{{"message":"bench: this deployment is down","type":"server_error"}}}}';
        }}
    }}
"""

# nginx as the reference proxy, tuned. Streaming both ways (no buffering of the body or the answer),
# but with buffers that fit the bench's messages: with proxy_buffering off nginx reads the answer
# into one buffer of proxy_buffer_size and writes out what it read, so at the default 4 KiB a 64 KiB
# speech answer took 16 reads and 16 writes (about half nginx's speed); 72k holds the 64 KiB and the
# head, one read and one write (checked with strace). proxy_buffers must be at least as large for
# nginx to accept the config (proxy_busy_buffers_size). client_body_buffer_size 256k: a 256 KiB
# upload goes up in 2 writes instead of 32 of 8 KiB. A buffered access log, as aisix logs every
# request too.
PROXY_SERVER = """\
    upstream {name} {{
        server 127.0.0.1:{upstream};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        access_log {dir}/access.log combined buffer=64k flush=1s;
        client_body_buffer_size 256k;
        location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_buffer_size 72k;
            proxy_buffers 8 64k;
        }}
    }}
"""


def nginx_user() -> str:
    if os.geteuid() != 0:
        return ""  # workers run as this user anyway
    return f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"


def start_nginx(name: str, dir: Path, body: str, cores: set[int], ports: list[int]) -> Proc:
    dir.mkdir(parents=True, exist_ok=True)
    conf = dir / "nginx.conf"
    conf.write_text(NGINX_COMMON.format(user=nginx_user(), dir=dir, body=body))
    nginx = find_tool("nginx")
    assert nginx is not None
    proc = Proc(name, [nginx, "-p", str(dir), "-c", str(conf), "-e", str(dir / "error.log")],
                cores, dir / "stdout.log")
    for port in ports:
        wait_port(port, proc)
    return proc


@dataclass
class Stack:
    tmp: Path
    ports: dict[str, int] = field(default_factory=dict)  # target -> port for the fast routes
    stream_ports: dict[str, int] = field(default_factory=dict)  # target -> port for first byte
    procs: dict[str, Proc] = field(default_factory=dict)
    metrics_port: int = 0
    metrics: str = ""


def write_upstream_root(root: Path) -> None:
    audio = root / "v1" / "audio"
    audio.mkdir(parents=True)
    frames = MP3_FRAME * (SPEECH_BYTES // len(MP3_FRAME) + 1)
    (audio / "speech").write_bytes(frames[:SPEECH_BYTES])
    for name in ("transcriptions", "translations"):  # must exist for the static handler's 405
        (audio / name).write_bytes(TRANSCRIPT)
    (root / "_transcript").write_bytes(TRANSCRIPT)


def aisix_config(dir: Path, listen: str, upstream: int, stream: int, metrics: str | None) -> Path:
    """A realistic config: auth, aliases, pricing, a key rate limit, budget and audio quota that
    never trip, an input guardrail that never matches, usage events to a file, metrics (when
    asked). JSON is YAML."""
    dir.mkdir(parents=True, exist_ok=True)
    upstream_names = ("gpt-4o-mini-tts", "whisper-1")

    def two_healthy(alias: str, name: str) -> dict[str, object]:
        """Two targets on the same upstream: never fails over, but uploads are copied for a replay."""
        return {"display_name": alias, "retry": {"max_attempts": 2}, "targets": [
            {"provider_key": "bench-fast", "model_name": name, "weight": 1, "priority": 0},
            {"provider_key": "bench-fast-2", "model_name": name, "weight": 1, "priority": 0}]}

    def after_503(alias: str, name: str) -> dict[str, object]:
        """The first target always answers 503; cooldown off, so every request fails over."""
        return {"display_name": alias, "retry": {"max_attempts": 2}, "cooldown": {"failures": 1_000_000},
                "targets": [{"provider_key": "bench-down", "model_name": name, "priority": 0},
                            {"provider_key": "bench-fast", "model_name": name, "priority": 1}]}

    config = {
        "proxy": {"listen": listen},
        "metrics": {"listen": metrics},
        "usage": {"sink": f"file:{dir / 'usage.jsonl'}"},
        "ratelimit": {"backend": "memory"},
        "resources_file": "resources.yaml",
    }
    resources = {
        "_format_version": "1",
        "provider_keys": [
            {"display_name": "bench-fast", "provider": "openai",
             "api_base": f"http://127.0.0.1:{upstream}/v1", "api_key": PROVIDER_KEY},
            {"display_name": "bench-fast-2", "provider": "openai",  # the same upstream, another key
             "api_base": f"http://127.0.0.1:{upstream}/v1", "api_key": PROVIDER_KEY},
            {"display_name": "bench-down", "provider": "openai",  # every answer a 503, at once
             "api_base": f"http://127.0.0.1:{upstream}/down/v1", "api_key": PROVIDER_KEY},
            {"display_name": "bench-stream", "provider": "openai",
             "api_base": f"http://127.0.0.1:{stream}/v1", "api_key": PROVIDER_KEY},
        ],
        "models": [
            # priced, so every request is measured and costed (metering on the hot path)
            {"display_name": "tts-bench", "provider_key": "bench-fast", "model_name": "gpt-4o-mini-tts",
             "pricing": {"per_1m_input_characters": 15.0, "per_minute_output_audio": 0.015}},
            {"display_name": "whisper-bench", "provider_key": "bench-fast", "model_name": "whisper-1",
             "pricing": {"per_minute_input_audio": 0.006}, "max_audio_seconds": 100_000},
            {"display_name": "tts-stream", "provider_key": "bench-stream", "model_name": "gpt-4o-mini-tts"},
            *(two_healthy(alias, name) for alias, name in zip(MODELS["failover"], upstream_names, strict=True)),
            *(after_503(alias, name) for alias, name in zip(AFTER_503_MODELS, upstream_names, strict=True)),
        ],
        "api_keys": [
            {"display_name": "bench", "key_hash": hashlib.sha256(API_KEY.encode()).hexdigest(),
             "allowed_models": ["tts-*", "whisper-*"],
             # limits that never trip, but are checked and charged: a budget and an audio quota too
             "rate_limit": {"rpm": 100_000_000, "cost_usd_per_day": 1e9, "audio_seconds_per_hour": 1_000_000_000}},
        ],
        "guardrails": [
            {"name": "bench-never", "kind": "keyword", "models": ["*"], "hook_point": "input",
             "enforcement_mode": "block", "patterns": [{"kind": "literal", "value": "zzzx-never"}]},
        ],
    }
    (dir / "config.yaml").write_text(json.dumps(config, indent=2))
    (dir / "resources.yaml").write_text(json.dumps(resources, indent=2))
    return dir / "config.yaml"


def start_aisix(name: str, config: Path, cores: set[int]) -> tuple[Proc, int]:
    """aisix as shipped: the access log on (to stderr, which the bench reads into a file). Its
    temporary files (a file-first upload held until its model is read, failover copies) go in
    the bench's directory, as nginx's temp paths do: the machine's /tmp may be a disk whose
    writeback throttles a 512 MiB spool, which measures the disk rather than the proxy."""
    proc = Proc(name, [sys.executable, "-m", "aisix", "serve", "-c", str(config)], cores, config.parent / f"{name}.log",
                env={"TMPDIR": str(config.parent)})
    m = proc.wait_for(r"aisix listening on http://[^\s:]+:(\d+)")
    return proc, int(m.group(1))


def make_real_mp3(dir: Path) -> Path:
    """30 s of a tone as a 44.1 kHz, 128 kb/s CBR MP3 (padded frames, the common case): more than
    FILE_KIB of real frames for the transcription-mp3 route."""
    tool = find_tool("ffmpeg")
    if tool is None:
        raise BenchError("ffmpeg is needed for the transcription-mp3 route (make bench installs it), "
                         "or leave the route out: BENCH_ROUTES=speech,transcription")
    out = dir / "bench.mp3"
    subprocess.run([tool, "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "sine=frequency=440:sample_rate=44100:duration=30", "-ac", "2", "-c:a", "libmp3lame",
                    "-b:a", "128k", str(out)], check=True, timeout=120)
    if out.stat().st_size < FILE_KIB * 1024:
        raise BenchError(f"{out} is smaller than {FILE_KIB} KiB")
    return out


def start_stack(tmp: Path) -> Stack:
    global REAL_MP3_PATH
    st = Stack(tmp)
    if "transcription-mp3" in ROUTES:
        REAL_MP3_PATH = make_real_mp3(tmp)
    up, px, px_stream = free_port(), free_port(), free_port()
    root = tmp / "upstream" / "root"
    write_upstream_root(root)
    st.procs["upstream"] = start_nginx("nginx upstream", tmp / "upstream",
                                       UPSTREAM_BODY.format(port=up, dir=tmp / "upstream"), LOAD_CORE, [up])
    st.ports["direct"] = up

    stream = Proc("stream upstream", [sys.executable, str(HERE / "stream_upstream.py"), "--listen",
                                      "127.0.0.1:0", "--chunks", str(STREAM_CHUNKS), "--pause-ms",
                                      str(STREAM_PAUSE_MS)], LOAD_CORE, tmp / "stream_upstream.log")
    st.procs["stream"] = stream
    stream_port = int(stream.wait_for(r"listening on http://[^\s:]+:(\d+)").group(1))
    st.stream_ports["direct"] = stream_port

    proxy_body = (PROXY_SERVER.format(name="fast", upstream=up, port=px, dir=tmp / "proxy")
                  + PROXY_SERVER.format(name="stream", upstream=stream_port, port=px_stream, dir=tmp / "proxy"))
    st.procs["nginx"] = start_nginx("nginx proxy", tmp / "proxy", proxy_body, PROXY_CORE, [px, px_stream])
    st.ports["nginx"] = px
    st.stream_ports["nginx"] = px_stream

    relays = {  # target -> script and its arguments
        "ceiling": ("ceiling.py", "--speech", str(root / "v1" / "audio" / "speech"),
                    "--transcript", str(root / "_transcript")),
        "raw": ("raw_relay.py", "--upstream", f"http://127.0.0.1:{up}"),
        "bare": ("bare_relay.py", "--upstream", f"http://127.0.0.1:{up}"),
    }
    for t, (script, *args) in relays.items():
        proc = Proc(LABEL[t], [sys.executable, str(HERE / script), "--listen", "127.0.0.1:0", *args], PROXY_CORE,
                    tmp / f"{t}.log")
        st.procs[t] = proc
        st.ports[t] = int(proc.wait_for(r"listening on http://[^\s:]+:(\d+)").group(1))

    st.metrics_port = free_port()
    config = aisix_config(tmp / "aisix", "127.0.0.1:0", up, stream_port, f"127.0.0.1:{st.metrics_port}")
    st.procs["aisix"], port = start_aisix("aisix", config, PROXY_CORE)
    st.procs["failover"] = st.procs["aisix"]
    st.ports["aisix"] = st.stream_ports["aisix"] = st.ports["failover"] = port
    return st


# -- a small HTTP/1.1 client (asyncio streams) ----------------------------------------------------

@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes          # kept only up to keep_limit bytes
    size: int
    first_byte: float    # perf_counter when the first body byte arrived (0 when none)


class Client:
    """One keep-alive connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> Client:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        self.writer.transport.set_write_buffer_limits(high=1 << 20)
        return self

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    @staticmethod
    def head(method: str, path: str, headers: dict[str, str], length: int) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def answer(self, keep_limit: int = 1 << 20) -> Answer:
        assert self.reader is not None
        r = self.reader
        head = await r.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers = {}
        for line in header_lines:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        kept, size, first = bytearray(), 0, 0.0

        async def take(n: int) -> None:
            nonlocal size, first
            while n:
                data = await r.read(min(n, 1 << 20))
                if not data:
                    raise BenchError("connection closed mid-answer")
                if not first:
                    first = time.perf_counter()
                n -= len(data)
                size += len(data)
                if len(kept) < keep_limit:
                    kept.extend(data[:keep_limit - len(kept)])

        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                n = int((await r.readline()).split(b";")[0], 16)
                if n == 0:
                    while (await r.readline()) not in (b"\r\n", b""):
                        pass
                    break
                await take(n)
                await r.readexactly(2)
        else:
            await take(int(headers.get("content-length", "0")))
        return Answer(status, headers, bytes(kept), size, first)

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        assert self.writer is not None
        self.writer.write(self.head(method, path, headers, len(body)) + body)
        return await self.answer()


def speech_body(model: str) -> bytes:
    return json.dumps({"model": model, "input": "The quick brown fox jumps over the lazy dog, twice.",
                       "voice": "alloy", "response_format": "mp3"}).encode()


JSON_HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
BOUNDARY = "----aisix-bench-upload-Zx81Kq"


def form_parts(model: str, model_first: bool) -> tuple[bytes, bytes]:
    """What goes before and after the file's bytes."""
    model_part = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n').encode()
    file_head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.mp3"\r\n'
                 'Content-Type: audio/mpeg\r\n\r\n').encode()
    close = f"--{BOUNDARY}--\r\n".encode()
    if model_first:
        return model_part + file_head, b"\r\n" + close
    return file_head, b"\r\n" + model_part + close


FORM_HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Authorization": f"Bearer {API_KEY}"}


async def check_target(name: str, port: int, models: tuple[str, str] = PLAIN_MODELS) -> None:
    """One request per route, checked, before anything is measured."""
    c = await Client(port).connect()
    try:
        a = await c.request("POST", "/v1/audio/speech", JSON_HEADERS, speech_body(models[0]))
        if a.status != 200 or a.size != SPEECH_BYTES or not a.body.startswith(b"\xff\xf3"):
            raise BenchError(f"{name}: speech answered {a.status}, {a.size} bytes: {a.body[:300]!r}")
        before, after = form_parts(models[1], True)
        for route in ("transcriptions", "translations"):
            body = before + os.urandom(FILE_KIB * 1024) + after
            a = await c.request("POST", f"/v1/audio/{route}", FORM_HEADERS, body)
            if a.status != 200 or b'"text"' not in a.body:
                raise BenchError(f"{name}: {route} answered {a.status}: {a.body[:300]!r}")
    finally:
        c.close()


async def check_upstream_reads_body(port: int) -> None:
    """The fast upstream must answer a transcription only once it has read the whole body;
    otherwise a proxy would get its answer with the upload still on its way."""
    before, after = form_parts("whisper-bench", True)
    body = before + bytes(2 << 20) + after
    c = await Client(port).connect()
    try:
        assert c.writer is not None and c.reader is not None
        c.writer.write(Client.head("POST", "/v1/audio/transcriptions", FORM_HEADERS, len(body)) + body[:1 << 20])
        with contextlib.suppress(asyncio.TimeoutError):
            early = await asyncio.wait_for(c.reader.read(1), 0.3)
            raise BenchError(f"the nginx upstream answered before reading the whole body: {early!r}")
        c.writer.write(body[1 << 20:])
        a = await asyncio.wait_for(c.answer(), 10)
        if a.status != 200:
            raise BenchError(f"the nginx upstream answered {a.status} to a whole body")
    finally:
        c.close()


async def probe_metrics(port: int) -> str:
    try:
        c = await asyncio.wait_for(Client(port).connect(), 2)
    except (TimeoutError, OSError):
        return (f"metrics.listen 127.0.0.1:{port} configured, nothing listens there "
                "(this aisix does not serve /metrics yet)")
    try:
        c.writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # type: ignore[union-attr]
        a = await asyncio.wait_for(c.answer(), 5)
        return f"metrics on 127.0.0.1:{port}: GET /metrics -> {a.status}, {a.size} bytes"
    except Exception as e:  # noqa: BLE001 (a probe: report, never fail)
        return f"metrics on 127.0.0.1:{port}: {type(e).__name__}"
    finally:
        c.close()


# -- wrk ------------------------------------------------------------------------------------------

@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu: float       # the target's processes, % of one core
    core0: float     # % busy of the load core (wrk + upstream)
    core1: float     # % busy of the proxy core
    others: float    # % of one core used by anything that is not this benchmark


def wrk(port: int, route: str, seconds: int, threads: int = 1, cores: set[int] | None = LOAD_CORE,
        watch: list[int] | None = None, models: tuple[str, str] = PLAIN_MODELS) -> Run:
    tool = find_tool("wrk")
    assert tool is not None
    path, script, _ = ROUTE_INFO[route]
    cmd = [*cpu_list(cores), tool, f"-t{threads}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "5s",
           "--latency", "-s", str(HERE / script), f"http://127.0.0.1:{port}{path}"]
    env = {**os.environ, "BENCH_KEY": API_KEY, "BENCH_TTS_MODEL": models[0],
           "BENCH_STT_MODEL": models[1], "BENCH_FILE_KIB": str(FILE_KIB),
           "BENCH_FILE_PATH": str(REAL_MP3_PATH) if route == "transcription-mp3" else ""}
    usage = Usage(watch or [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, env=env,
                             start_new_session=True, preexec_fn=_die_with_parent)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish in {seconds + 30} s") from None
    cpu, busy, others = usage.done()
    m = re.search(r"^BENCH_JSON (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or m is None:
        raise BenchError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    j = json.loads(m.group(1))
    errors = sum(j[k] for k in ("connect", "read", "write", "status", "timeout"))
    return Run(j["requests"] / (j["duration_us"] / 1e6), j["p50_us"] / 1000, j["p99_us"] / 1000, errors,
               cpu, busy.get(0, 0.0), busy.get(1, 0.0), others)


def target_pids(st: Stack, target: str) -> list[int]:
    proc = st.procs["upstream" if target == "direct" else target]  # failover: the aisix process
    return proc.children() if target in ("direct", "nginx") else [proc.pid]  # nginx: its worker


# -- measurements ---------------------------------------------------------------------------------

def measure_routes(st: Stack) -> dict[str, dict[str, list[Run]]]:
    for route in ROUTES:  # warm every target up (connections, pools, caches); not recorded
        for t in TARGETS:
            wrk(st.ports[t], route, WARMUP_SECONDS, models=MODELS.get(t, PLAIN_MODELS))
    runs: dict[str, dict[str, list[Run]]] = {r: {t: [] for t in TARGETS} for r in ROUTES}
    for i in range(ROUNDS):
        for route in ROUTES:
            line = []
            for t in TARGETS:
                run = wrk(st.ports[t], route, SECONDS, watch=target_pids(st, t),
                          models=MODELS.get(t, PLAIN_MODELS))
                runs[route][t].append(run)
                line.append(f"{LABEL[t]} {run.rps:,.0f}")
            progress(f"round {i + 1}/{ROUNDS} {route}: " + ", ".join(line) + " req/s")
    return runs


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def first_byte(st: Stack) -> dict[str, list[float]]:
    """Time to the first audio byte, ms, request by request, alternating between the targets."""
    names = ("nginx", "aisix")
    clients = {n: await Client(st.stream_ports[n]).connect() for n in names}
    body = speech_body("tts-stream")
    head = Client.head("POST", "/v1/audio/speech", JSON_HEADERS, len(body))
    times: dict[str, list[float]] = {n: [] for n in names}
    warmup = 5
    try:
        async with asyncio.timeout(FIRST_BYTE_N * len(names) * 2 + 60):
            for i in range(warmup + FIRST_BYTE_N):
                for n in (names if i % 2 == 0 else names[::-1]):
                    c = clients[n]
                    assert c.writer is not None
                    t0 = time.perf_counter()
                    c.writer.write(head + body)
                    a = await c.answer(keep_limit=0)
                    if a.status != 200 or a.size != STREAM_CHUNKS * 3840:
                        raise BenchError(f"first byte via {n}: status {a.status}, {a.size} bytes")
                    if i >= warmup:
                        times[n].append((a.first_byte - t0) * 1000)
    finally:
        for c in clients.values():
            c.close()
    return times


async def failover_cost(st: Stack) -> dict[tuple[str, str], list[float]]:
    """What a failover costs, ms, request by request: speech's time to its first audio byte and a
    256 KiB transcription's time to the end of its answer, through the plain alias and through the
    alias whose first target answers 503, alternating (one keep-alive connection each, to aisix)."""
    port = st.ports["aisix"]
    file = os.urandom(FILE_KIB * 1024).replace(BOUNDARY.encode(), b"x" * len(BOUNDARY))
    kinds = {"plain": PLAIN_MODELS, "after 503": AFTER_503_MODELS}
    clients = {k: await Client(port).connect() for k in kinds}
    requests = {}
    for k, (tts, stt) in kinds.items():
        body = speech_body(tts)
        before, after = form_parts(stt, True)
        form = before + file + after
        requests[(k, "speech")] = Client.head("POST", "/v1/audio/speech", JSON_HEADERS, len(body)) + body
        requests[(k, "transcription")] = (Client.head("POST", "/v1/audio/transcriptions", FORM_HEADERS, len(form))
                                          + form)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in requests}
    warmup = 5
    order = list(kinds)
    try:
        async with asyncio.timeout(FIRST_BYTE_N * 4 * 2 + 60):
            for route in ("speech", "transcription"):
                for i in range(warmup + FIRST_BYTE_N):
                    for k in (order if i % 2 == 0 else order[::-1]):
                        c = clients[k]
                        assert c.writer is not None
                        t0 = time.perf_counter()
                        c.writer.write(requests[(k, route)])
                        a = await c.answer(keep_limit=0 if route == "speech" else 1 << 16)
                        t1 = time.perf_counter()
                        ok = a.size == SPEECH_BYTES if route == "speech" else b'"text"' in a.body
                        if a.status != 200 or not ok:
                            raise BenchError(f"failover cost, {route} via the {k} alias: status {a.status}, "
                                             f"{a.size} bytes")
                        if i >= warmup:
                            times[(k, route)].append(((a.first_byte if route == "speech" else t1) - t0) * 1000)
    finally:
        for c in clients.values():
            c.close()
    return times


async def attempts_by_alias(port: int) -> dict[str, dict[tuple[str, str], int]]:
    """aisix_upstream_attempts_total from /metrics: alias -> (provider key, outcome) -> count."""
    try:
        c = await asyncio.wait_for(Client(port).connect(), 2)
    except (OSError, TimeoutError):
        return {}
    try:
        c.writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # type: ignore[union-attr]
        a = await asyncio.wait_for(c.answer(keep_limit=16 << 20), 5)
    except Exception:  # noqa: BLE001 (a probe: report nothing, never fail)
        return {}
    finally:
        c.close()
    out: dict[str, dict[tuple[str, str], int]] = {}
    for line in a.body.decode().splitlines():
        if not line.startswith("aisix_upstream_attempts_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        count = int(float(line.rsplit(" ", 1)[1]))
        out.setdefault(labels.get("model", "?"), {})[(labels.get("provider_key", "?"),
                                                       labels.get("outcome", "?"))] = count
    return out


def attempts_text(counts: dict[tuple[str, str], int]) -> str:
    return ", ".join(f"{k} {o} x{n:,}" for (k, o), n in sorted(counts.items())) or "none"


@dataclass
class Upload:
    mib_s: float
    rss_growth_mib: float | None
    seconds: float
    rss_before_mib: float | None = None
    sent_s: float = 0.0  # from the first byte sent to the last (the rest: waiting for the answer)


async def big_upload(port: int, model_first: bool, pid: int | None, model: str = PLAIN_MODELS[1]) -> Upload:
    """UPLOAD_MIB of file in a multipart body, generated as it is sent, with Content-Length."""
    before, after = form_parts(model, model_first)
    block = os.urandom(1 << 20)
    if BOUNDARY.encode() in block:
        block = block.replace(BOUNDARY.encode(), b"x" * len(BOUNDARY))
    size = UPLOAD_MIB << 20
    length = len(before) + size + len(after)
    rss0 = 0
    if pid is not None:
        rss0 = status_kib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from the current RSS
    c = await Client(port).connect()
    try:
        async with asyncio.timeout(300):
            t0 = time.perf_counter()
            w = c.writer
            assert w is not None
            w.write(Client.head("POST", "/v1/audio/transcriptions", FORM_HEADERS, length) + before)
            view = memoryview(block)
            for _ in range(UPLOAD_MIB):
                w.write(view)
                await w.drain()
            w.write(after)
            await w.drain()
            sent = time.perf_counter() - t0
            a = await c.answer()
            elapsed = time.perf_counter() - t0
    finally:
        c.close()
    if a.status != 200 or b'"text"' not in a.body:
        raise BenchError(f"upload to port {port}: status {a.status}: {a.body[:300]!r}")
    growth = None
    if pid is not None:
        growth = (status_kib(pid, "VmHWM") - rss0) / 1024
    return Upload(size / (1 << 20) / elapsed, growth, elapsed, rss0 / 1024 if pid is not None else None, sent)


UPLOAD_TARGETS = ("direct", "nginx", "aisix", "failover")


async def measure_uploads(st: Stack) -> dict[tuple[str, bool], list[Upload]]:
    out: dict[tuple[str, bool], list[Upload]] = {}
    for i in range(ROUNDS):
        for model_first in (True, False):
            line = []
            # The two aliases swap places every round: whichever ran right after nginx read less
            # on a file-first upload, with the same code (bench/README.md, "What the numbers mean").
            order = UPLOAD_TARGETS if i % 2 == 0 else (*UPLOAD_TARGETS[:2], *reversed(UPLOAD_TARGETS[2:]))
            for t in order:
                pid = st.procs["aisix"].pid if t in ("aisix", "failover") else None
                u = await big_upload(st.ports[t], model_first, pid, MODELS.get(t, PLAIN_MODELS)[1])
                out.setdefault((t, model_first), []).append(u)
                rss = "" if u.rss_growth_mib is None else f" (RSS +{u.rss_growth_mib:.1f} MiB)"
                line.append(f"{LABEL[t]} {u.mib_s:,.0f}{rss}")
            progress(f"round {i + 1}/{ROUNDS} upload {'model first' if model_first else 'file first'}: "
                     + ", ".join(line) + " MiB/s")
    return out


@dataclass
class Pair:
    one: list[Run]
    two: list[Run]
    cpu_split: list[tuple[float, float]]   # CPU seconds of each of the two processes, per round
    note: str = ""


def measure_pair(st: Stack) -> Pair:
    """The same config, two processes on one port (SO_REUSEPORT) against one, wrk on 2 threads,
    nothing pinned."""
    port = free_port()
    up, stream = st.ports["direct"], st.stream_ports["direct"]
    config = aisix_config(st.tmp / "pair", f"127.0.0.1:{port}", up, stream, None)
    both = {0, 1} if HAVE_TWO_CORES else None
    pair = Pair([], [], [])
    first, port_a = start_aisix("aisix-a", config, both)
    if port_a != port:
        raise BenchError(f"aisix-a listens on {port_a}, not {port}")
    try:
        wrk(port, "speech", WARMUP_SECONDS, threads=2, cores=both)
        for i in range(ROUNDS):
            pair.one.append(wrk(port, "speech", SECONDS, threads=2, cores=both, watch=[first.pid]))
            second = Proc("aisix-b", [sys.executable, "-m", "aisix", "serve", "-c", str(config),
                                      "--access-log", "off"], both, config.parent / "aisix-b.log")
            try:
                second.wait_for(r"aisix listening on")
            except BenchError as e:
                second.stop()
                pair.note = ("a second aisix process could not listen on the same port: "
                             + str(e).splitlines()[0] + "\n" + second.tail(5))
                return pair
            wrk(port, "speech", WARMUP_SECONDS, threads=2, cores=both)
            a0, b0 = cpu_seconds([first.pid]), cpu_seconds([second.pid])
            pair.two.append(wrk(port, "speech", SECONDS, threads=2, cores=both,
                                watch=[first.pid, second.pid]))
            pair.cpu_split.append((cpu_seconds([first.pid]) - a0, cpu_seconds([second.pid]) - b0))
            second.stop()
            progress(f"round {i + 1}/{ROUNDS} one process {pair.one[-1].rps:,.0f} req/s, "
                     f"two processes {pair.two[-1].rps:,.0f} req/s")
    finally:
        first.stop()
    return pair


# -- output ---------------------------------------------------------------------------------------

def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    distro = ""
    with contextlib.suppress(OSError):
        distro = re.search(r'PRETTY_NAME="([^"]*)"', Path("/etc/os-release").read_text()).group(1)  # type: ignore[union-attr]
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {distro}, "
            f"Linux {platform.release()}")


def versions() -> str:
    def first_line(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else "?"

    import aiohttp

    nginx = first_line([find_tool("nginx") or "nginx", "-v"]).replace("nginx version: ", "")
    wrk_v = first_line([find_tool("wrk") or "wrk", "-v"]).split(" Copyright")[0]
    rev = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "aisix"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return (f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, {nginx}, {wrk_v}, "
            f"aisix at {rev}{' + uncommitted changes in aisix/' if dirty else ''}")


def rounds() -> str:
    return f"{ROUNDS} round{'s' if ROUNDS != 1 else ''}"


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report_routes(runs: dict[str, dict[str, list[Run]]]) -> dict[str, dict[str, float]]:
    ratios: dict[str, dict[str, float]] = {}
    for route in ROUTES:
        path, _, what = ROUTE_INFO[route]
        print(f"\n{route}: POST {path} ({what})")
        print(f"  wrk -t1 -c{CONNECTIONS} --latency, {rounds()} x {SECONDS} s, medians over rounds")
        print(f"  {'':<{W}}{'req/s':>9}  {'(min-max)':<17}{'p50 ms':>8}{'p99 ms':>8}{'errors':>8}"
              f"{'proc cpu':>10}{'req/cpu-s':>11}{'core0':>7}{'core1':>7}{'others':>8}")
        m = {}
        for t in TARGETS:
            rs = runs[route][t]
            m[t] = (med([r.rps for r in rs]), med([r.p50_ms for r in rs]), med([r.p99_ms for r in rs]),
                    med([r.rps / (r.cpu / 100) if r.cpu > 0 else float("nan") for r in rs]))
            spread = f"({min(r.rps for r in rs):,.0f}-{max(r.rps for r in rs):,.0f})"
            print(f"  {LABEL[t]:<{W}}{m[t][0]:>9,.0f}  {spread:<17}{m[t][1]:>8.2f}{m[t][2]:>8.2f}"
                  f"{sum(r.errors for r in rs):>8}{med([r.cpu for r in rs]):>9.0f}%{m[t][3]:>11,.0f}"
                  f"{med([r.core0 for r in rs]):>6.0f}%{med([r.core1 for r in rs]):>6.0f}%"
                  f"{med([r.others for r in rs]):>7.0f}%")
        # keys: rps_nginx, p99_nginx, cpu_nginx, ... for aisix; the same with fo_ for the failover alias
        r = ratios[route] = {"errors": sum(run.errors for t in TARGETS for run in runs[route][t])}
        print(f"  {'ratios of the medians':<32}{'req/s':>8}{'p99':>8}{'req/cpu-s':>11}   (req/s, req/cpu-s: "
              "higher is better; p99: lower)")
        for who, prefix in (("aisix", ""), ("failover", "fo_")):
            for ref in (*REFERENCES, "aisix") if who == "failover" else REFERENCES:
                for i, key in ((0, "rps"), (2, "p99"), (3, "cpu")):
                    r[f"{prefix}{key}_{ref}"] = ratio(m[who][i], m[ref][i])
                name = f"{LABEL[who]}/{LABEL[ref]}"
                print(f"  {name:<32}{r[f'{prefix}rps_{ref}']:>7.2f}x{r[f'{prefix}p99_{ref}']:>7.2f}x"
                      f"{r[f'{prefix}cpu_{ref}']:>10.2f}x")
    return ratios


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    missing = [t for t in ("nginx", "wrk", "taskset") if find_tool(t) is None]
    if missing:
        print(f"bench: missing {' '.join(missing)} (Debian: apt-get install -y nginx wrk; `make bench` "
              "does it)", file=sys.stderr)
        return 2
    for route in ROUTES:
        if route not in ROUTE_INFO:
            print(f"bench: unknown route {route!r} in BENCH_ROUTES", file=sys.stderr)
            return 2
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr] (in order with progress)
    if HAVE_TWO_CORES:
        os.sched_setaffinity(0, LOAD_CORE)  # this process is a load generator too (first byte, uploads)

    # The run's bound, generous: at the defaults the run takes about 6 minutes on the 2-core VM, this
    # allows about 13.
    budget = (len(ROUTES) * len(TARGETS) * (ROUNDS * SECONDS + WARMUP_SECONDS + 1)  # wrk, every target
              + ROUNDS * 2 * (SECONDS + WARMUP_SECONDS + 3)  # one process vs two
              + FIRST_BYTE_N * 2 * (STREAM_CHUNKS * STREAM_PAUSE_MS / 1000 + 0.01)
              + FIRST_BYTE_N * 4 * 0.05  # failover cost
              + ROUNDS * 2 * len(UPLOAD_TARGETS) * UPLOAD_MIB / 50
              + 10 * (len(TARGETS) + 2)  # starting each process of the stack, and checking it
              + 60)
    return harness("aisix-bench-", int(budget), measure_and_report)


def measure_and_report(tmp: Path) -> int:
    started = time.monotonic()
    print(f"aisix benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"machine: {machine()}")
    print(f"software: {versions()}")
    if HAVE_TWO_CORES:
        print("layout: proxies under test pinned to core 1; wrk, the nginx upstream, the streaming "
              "upstream and this client on core 0")
    else:
        print("layout: fewer than 2 cores available: nothing is pinned, figures are rough")
    before = Usage([])
    time.sleep(1)
    _, busy, others = before.done()
    print(f"load before start: {others:.0f}% of a core in other processes "
          f"({', '.join(f'core{c} {b:.0f}%' for c, b in sorted(busy.items()))} busy)")
    progress(f"starting the stack in {tmp}")
    st = start_stack(tmp)
    asyncio.run(_checks(st))
    print(f"aisix: auth (api key), aliases, prices (per character, per minute of audio in and out), "
          f"max_audio_seconds, a key rate limit rpm 100000000 with a budget and an audio quota that never "
          f"trip, input guardrail (never matches), usage events to a file; {st.metrics}")
    print("references: nginx tuned (proxy_buffer_size 72k, client_body_buffer_size 256k, buffered access "
          "log); aiohttp ceiling (aiohttp and uvloop answering by itself, no upstream); raw relay (asyncio "
          "Protocols, httptools and uvloop, no framework); bare relay (aiohttp server and ClientSession)")
    print("aisix failover: aliases tts-failover/whisper-failover, two targets (provider keys bench-fast "
          "and bench-fast-2, both on the nginx upstream, weight 1 each), retry.max_attempts 2, "
          "replay_limit_bytes default (256 MiB): uploads are copied to an unlinked temp file as they stream")

    runs = measure_routes(st)
    ratios = report_routes(runs)
    counts = asyncio.run(attempts_by_alias(st.metrics_port))
    print("\naisix failover: upstream attempts over the wrk runs (aisix_upstream_attempts_total; aborted: "
          "wrk closed the connection mid-request at the end of a run): "
          + "; ".join(f"{alias}: {attempts_text(counts.get(alias, {}))}" for alias in MODELS["failover"]))
    # "aborted": wrk closed the connection mid-request at the end of a run; anything else but 200
    # would be a failover on an alias whose targets are both healthy
    healthy_failed = sum(n for alias in MODELS["failover"] for (_, o), n in counts.get(alias, {}).items()
                         if o not in ("200", "aborted"))

    progress(f"first byte: {FIRST_BYTE_N} sequential speech requests per target")
    fb = asyncio.run(first_byte(st))
    fb_med = {n: med(v) for n, v in fb.items()}
    added = fb_med["aisix"] - fb_med["nginx"]
    print(f"\nspeech first byte: streaming upstream ({STREAM_CHUNKS} chunks, first at once, then "
          f"every {STREAM_PAUSE_MS} ms), {FIRST_BYTE_N} sequential requests per target, alternating")
    for n in ("nginx", "aisix"):
        print(f"  {LABEL[n]:<11} median {fb_med[n]:.2f} ms, p90 {quantile(fb[n], 0.9):.2f} ms, "
              f"min {min(fb[n]):.2f} ms")
    print(f"  aisix adds {added:.2f} ms over nginx tuned (median)")

    progress(f"big uploads: {UPLOAD_MIB} MiB, both field orders")
    ups = asyncio.run(measure_uploads(st))
    mib = {k: med([u.mib_s for u in v]) for k, v in ups.items()}
    growth = {mf: max(u.rss_growth_mib or 0.0 for u in ups[("aisix", mf)]) for mf in (True, False)}
    print(f"\nbig upload: {UPLOAD_MIB} MiB multipart transcription with Content-Length, generated while "
          f"sent; {rounds()}, medians")
    print(f"  {'':<13}{'no proxy':>14}{'nginx tuned':>12}{'aisix':>12}{'aisix/nginx':>13}{'aisix RSS growth':>18}")
    for mf in (True, False):
        print(f"  {'model first' if mf else 'file first':<13}{mib[('direct', mf)]:>8,.0f} MiB/s"
              f"{mib[('nginx', mf)]:>6,.0f} MiB/s{mib[('aisix', mf)]:>6,.0f} MiB/s"
              f"{ratio(mib[('aisix', mf)], mib[('nginx', mf)]):>12.2f}x{growth[mf]:>13.1f} MiB")
    rss_before = max(u.rss_before_mib or 0.0 for mf in (True, False) for u in ups[("aisix", mf)])
    print("  RSS growth: peak VmHWM during the upload minus VmRSS before it, the largest of the rounds "
          f"(aisix's VmRSS before: up to {rss_before:.0f} MiB, after the wrk runs)")
    print("  file first: aisix must hold the file (an unlinked temp file) until it reads the model, "
          "then replays it; nginx streams it on at once")
    held = ups[("aisix", False)]
    take, replay = med([u.sent_s for u in held]), med([u.seconds - u.sent_s for u in held])
    whole = med([u.seconds for u in ups[("nginx", False)]])
    print(f"  file first, in time: aisix takes the upload in {take:.2f} s, then replays it in {replay:.2f} s "
          f"(medians); nginx passes it through in {whole:.2f} s. Taking and replaying one after the other, "
          "each at the pace of the other end, a proxy that must read the model first is bounded by about "
          "0.5x one that streams at once")
    fo_growth = {mf: max(u.rss_growth_mib or 0.0 for u in ups[("failover", mf)]) for mf in (True, False)}
    print(f"  {'':<13}{'aisix failover':>20}{'failover/nginx':>16}{'failover RSS growth':>21}")
    for mf in (True, False):
        print(f"  {'model first' if mf else 'file first':<13}{mib[('failover', mf)]:>14,.0f} MiB/s"
              f"{ratio(mib[('failover', mf)], mib[('nginx', mf)]):>15.2f}x{fo_growth[mf]:>16.1f} MiB")
    print("  aisix failover: the same upload through whisper-failover (two healthy targets): what goes "
          "upstream is also copied to an unlinked temp file, up to retry.replay_limit_bytes (256 MiB), "
          "then the copy is dropped")

    progress(f"failover cost: {FIRST_BYTE_N} sequential requests per alias and route")
    cost = asyncio.run(failover_cost(st))
    counts = asyncio.run(attempts_by_alias(st.metrics_port))
    print(f"\nfailover cost: aisix, {FIRST_BYTE_N} sequential requests per alias, alternating, one keep-alive "
          "connection each; plain: tts-bench/whisper-bench (bench-fast); after 503: tts-after-503/"
          "whisper-after-503, priority-0 target bench-down (nginx `return 503` at once), priority-1 "
          "bench-fast, cooldown off (failures 1000000) so every request fails over")
    added_cost: dict[str, tuple[float, float]] = {}
    for route, what in (("speech", "speech, first audio byte"),
                        ("transcription", f"{FILE_KIB} KiB transcription, whole answer")):
        plain, failed = cost[("plain", route)], cost[("after 503", route)]
        added_cost[route] = (med(failed) - med(plain), quantile(failed, 0.9) - quantile(plain, 0.9))
        print(f"  {what}")
        for k, v in (("plain", plain), ("after 503", failed)):
            print(f"    {k:<11} median {med(v):.2f} ms, p90 {quantile(v, 0.9):.2f} ms, min {min(v):.2f} ms")
        print(f"    a failover adds {added_cost[route][0]:+.2f} ms (median), {added_cost[route][1]:+.2f} ms (p90)")
    print("  upstream attempts (aisix_upstream_attempts_total): "
          + "; ".join(f"{alias}: {attempts_text(counts.get(alias, {}))}" for alias in AFTER_503_MODELS))

    progress("one process vs two on one port")
    pair = measure_pair(st)
    print(f"\none process vs two on one port (SO_REUSEPORT), speech, wrk -t2 -c{CONNECTIONS}, "
          "nothing pinned, metrics off")
    one = med([r.rps for r in pair.one])
    print(f"  1 process   {one:>9,.0f} req/s  p99 {med([r.p99_ms for r in pair.one]):.2f} ms  "
          f"errors {sum(r.errors for r in pair.one)}")
    if pair.two:
        two = med([r.rps for r in pair.two])
        print(f"  2 processes {two:>9,.0f} req/s  p99 {med([r.p99_ms for r in pair.two]):.2f} ms  "
              f"errors {sum(r.errors for r in pair.two)}  ({ratio(two, one):.2f}x)")
        split = ", ".join(f"{a:.1f}+{b:.1f}" for a, b in pair.cpu_split)
        print(f"  CPU seconds per round, process A + B: {split} (both served)")
    if pair.note:
        print(f"  NOT MEASURED: {pair.note}")
    print("  note: 2 cores only, so wrk (and the upstream) compete with the gateways for CPU; "
          "this shows that two processes share the port, not how they scale")

    errors = sum(r["errors"] for r in ratios.values())
    checks = []
    for route, label in (("speech", "speech"), ("transcription", f"{FILE_KIB} KiB transcription"),
                         ("transcription-mp3", f"{FILE_KIB} KiB transcription of a real MP3 (probe on)")):
        if route in ratios:
            r = ratios[route]
            checks.append((r["rps_bare"] >= MIN_RPS_VS_BARE,
                           f"{label} req/s >= {MIN_RPS_VS_BARE}x bare relay: {r['rps_bare']:.2f}x"))
            checks.append((r["p99_bare"] <= MAX_P99_VS_BARE,
                           f"{label} p99 <= {MAX_P99_VS_BARE}x bare relay's: {r['p99_bare']:.2f}x"))
    checks.append((added <= MAX_FIRST_BYTE_ADDED_MS,
                   f"speech first byte <= {MAX_FIRST_BYTE_ADDED_MS:g} ms added over nginx: {added:.2f} ms"))
    for mf in (True, False):
        order = "model first" if mf else "file first"
        up_ratio = ratio(mib[("aisix", mf)], mib[("nginx", mf)])
        checks.append((up_ratio >= MIN_UPLOAD_VS_NGINX,
                       f"{UPLOAD_MIB} MiB upload ({order}) >= {MIN_UPLOAD_VS_NGINX}x nginx MiB/s: {up_ratio:.2f}x"))
        checks.append((growth[mf] <= MAX_RSS_GROWTH_MIB,
                       f"{UPLOAD_MIB} MiB upload ({order}) RSS growth <= {MAX_RSS_GROWTH_MIB:g} MiB: "
                       f"{growth[mf]:.1f} MiB"))
    for route, label in (("speech", "speech"), ("transcription", f"{FILE_KIB} KiB transcription")):
        if route in ratios:
            r = ratios[route]
            checks.append((r["fo_rps_bare"] >= MIN_RPS_VS_BARE,
                           f"failover alias: {label} req/s >= {MIN_RPS_VS_BARE}x bare relay: "
                           f"{r['fo_rps_bare']:.2f}x"))
    for mf in (True, False):
        order = "model first" if mf else "file first"
        up_ratio = ratio(mib[("failover", mf)], mib[("nginx", mf)])
        checks.append((up_ratio >= MIN_UPLOAD_VS_NGINX,
                       f"failover alias: {UPLOAD_MIB} MiB upload ({order}) >= {MIN_UPLOAD_VS_NGINX}x nginx "
                       f"MiB/s: {up_ratio:.2f}x"))
        checks.append((fo_growth[mf] <= MAX_RSS_GROWTH_MIB,
                       f"failover alias: {UPLOAD_MIB} MiB upload ({order}) RSS growth <= "
                       f"{MAX_RSS_GROWTH_MIB:g} MiB: {fo_growth[mf]:.1f} MiB"))
    checks_18 = []
    for route, label in (("speech", "speech"), ("transcription", f"{FILE_KIB} KiB transcription")):
        if route in ratios:
            r = ratios[route]
            checks_18.append((r["rps_nginx"] >= MIN_RPS_VS_NGINX,
                              f"{label} req/s >= {MIN_RPS_VS_NGINX}x nginx tuned: {r['rps_nginx']:.2f}x"))
            checks_18.append((r["rps_ceiling"] >= MIN_RPS_VS_CEILING,
                              f"{label} req/s >= {MIN_RPS_VS_CEILING}x aiohttp ceiling: {r['rps_ceiling']:.2f}x"))
            checks_18.append((r["p99_nginx"] <= MAX_P99_VS_NGINX,
                              f"{label} p99 <= {MAX_P99_VS_NGINX:g}x nginx tuned's: {r['p99_nginx']:.2f}x"))
    checks_18.append((added <= MAX_FIRST_BYTE_ADDED_MS_18,
                      f"speech first byte <= {MAX_FIRST_BYTE_ADDED_MS_18:g} ms added over nginx tuned: "
                      f"{added:.2f} ms"))
    for mf in (True, False):
        order = "model first" if mf else "file first"
        up_ratio = ratio(mib[("aisix", mf)], mib[("nginx", mf)])
        checks_18.append((up_ratio >= MIN_UPLOAD_VS_NGINX_18 and growth[mf] <= MAX_RSS_GROWTH_MIB,
                          f"{UPLOAD_MIB} MiB upload ({order}) >= {MIN_UPLOAD_VS_NGINX_18:.1f}x nginx tuned "
                          f"MiB/s with RSS growth <= {MAX_RSS_GROWTH_MIB:g} MiB: {up_ratio:.2f}x, "
                          f"{growth[mf]:.1f} MiB"))
    print("\nsummary")
    print("  issues 12, 13, 14: against the bare relay (first byte and uploads: against nginx)")
    for ok, text in checks:
        print(f"  {verdict(ok)}  {text}")
    print("  issue 18: against the real limits (tuned nginx, the aiohttp ceiling), plain alias")
    for ok, text in checks_18:
        print(f"  {verdict(ok)}  {text}")
    print(f"  {'ok  ' if errors == 0 else 'WARN'}  errors in the wrk runs: {errors}")
    print(f"  {'ok  ' if healthy_failed == 0 else 'WARN'}  failed attempts (failovers) through the healthy "
          f"failover aliases during the wrk runs: {healthy_failed}")
    print(f"  info  failover cost (a 503, then the next target): speech first byte "
          f"{added_cost['speech'][0]:+.2f} ms median ({added_cost['speech'][1]:+.2f} ms p90), "
          f"{FILE_KIB} KiB transcription {added_cost['transcription'][0]:+.2f} ms median "
          f"({added_cost['transcription'][1]:+.2f} ms p90)")
    noise = med([r.others for rs in runs.values() for t in TARGETS for r in rs[t]])
    noisy = "" if noise <= NOISY else ": the figures are noisy, run again on a quiet machine"
    print(f"  {'ok  ' if noise <= NOISY else 'WARN'}  other load on the machine during the wrk runs: "
          f"{noise:.0f}% of a core (median){noisy}")
    print(f"\ntook {time.monotonic() - started:.0f} s")
    failed = sum(not ok for ok, _ in checks + checks_18)
    return 1 if STRICT and (failed or errors) else 0


async def _checks(st: Stack) -> None:
    await check_upstream_reads_body(st.ports["direct"])
    await check_down(st.ports["direct"])
    for t in TARGETS:
        await check_target(LABEL[t], st.ports[t], MODELS.get(t, PLAIN_MODELS))
    await check_target("aisix, alias after a 503", st.ports["aisix"], AFTER_503_MODELS)
    st.metrics = await probe_metrics(st.metrics_port)


async def check_down(port: int) -> None:
    """The failing deployment answers 503 to each route."""
    c = await Client(port).connect()
    try:
        a = await c.request("POST", "/down/v1/audio/speech", JSON_HEADERS, speech_body("x"))
        before, after = form_parts("x", True)
        b = await c.request("POST", "/down/v1/audio/transcriptions", FORM_HEADERS, before + bytes(4096) + after)
        if a.status != 503 or b.status != 503:
            raise BenchError(f"the nginx upstream's /down/ answered {a.status} and {b.status}, not 503")
    finally:
        c.close()


if __name__ == "__main__":
    sys.exit(main())
