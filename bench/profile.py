"""`make profile`: where aisix spends its CPU under load, by source file and by function.

Starts the nginx upstream and aisix (this tree, the bench's config: every feature on, the access
log on as shipped) pinned as in `bench/run.py`, drives one route with wrk and samples aisix with
py-spy meanwhile. Prints the share of samples spent in each file (self time: the frame on top of
the stack) and the heaviest functions, self and inclusive. Used for the before/after profiles in
docs/design.md ("Performance").

Environment (all optional): PROFILE_ROUTE (speech; or transcription, transcription-mp3), PROFILE_SECONDS (10),
PROFILE_TOP (25), PROFILE_RAW (a path: keep py-spy's collapsed stacks there), PROFILE_NATIVE (1: C
frames too, with the process stopped at each sample), PROFILE_ALIAS (failover: the aliases with two
targets).
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run

ROUTE = os.environ.get("PROFILE_ROUTE", "speech")
SECONDS = run._env_int("PROFILE_SECONDS", 10)
TOP = run._env_int("PROFILE_TOP", 25)
NATIVE = os.environ.get("PROFILE_NATIVE", "") == "1"
MODELS = run.MODELS["failover"] if os.environ.get("PROFILE_ALIAS") == "failover" else run.PLAIN_MODELS


def short(filename: str) -> str:
    """A frame's file, shortened: aisix/x.py, aiohttp/x.py, asyncio/x.py, ..."""
    parts = filename.split("/")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in ("aisix", "aiohttp", "asyncio", "multidict", "yarl", "prometheus_client",
                        "logging", "json", "uvloop", "httptools", "email", "http", "urllib"):
            return "/".join(parts[i:])
    return parts[-1]


def summarise(raw: Path) -> None:
    by_file: collections.Counter[str] = collections.Counter()
    self_fn: collections.Counter[str] = collections.Counter()
    incl_fn: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        top = frames[-1]
        name, _, where = top.partition(" (")
        file = short(where.rsplit(":", 1)[0].rstrip(")"))
        by_file[file] += n
        self_fn[f"{name} ({file})"] += n
        for f in set(frames):
            fname, _, fwhere = f.partition(" (")
            incl_fn[f"{fname} ({short(fwhere.rsplit(':', 1)[0].rstrip(')'))})"] += n
    if not total:
        print("profile: no samples")
        return
    print(f"\n{total} samples; self time by file:")
    for file, n in by_file.most_common(TOP):
        print(f"  {100 * n / total:5.1f} %  {file}")
    print("\nself time by function:")
    for fn, n in self_fn.most_common(TOP):
        print(f"  {100 * n / total:5.1f} %  {fn}")
    print("\ninclusive time by function (aisix's own):")
    shown = 0
    for fn, n in incl_fn.most_common():
        if "(aisix/" in fn:
            print(f"  {100 * n / total:5.1f} %  {fn}")
            shown += 1
            if shown == TOP:
                break


def main() -> int:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent) + ":" + os.environ.get("PATH", ""))
    if spy is None:
        print("profile: py-spy is missing (`make profile` installs it in the venv)", file=sys.stderr)
        return 2
    if ROUTE not in run.ROUTE_INFO:
        print(f"profile: unknown route {ROUTE!r}", file=sys.stderr)
        return 2
    if run.HAVE_TWO_CORES:
        os.sched_setaffinity(0, run.LOAD_CORE)
    tmp = Path(tempfile.mkdtemp(prefix="aisix-profile-"))
    run.Reaper.start(tmp)
    try:
        if ROUTE == "transcription-mp3":  # the file wrk sends, as bench/run.py makes it
            run.REAL_MP3_PATH = run.make_real_mp3(tmp)
        up = run.free_port()
        run.write_upstream_root(tmp / "upstream" / "root")
        run.start_nginx("nginx upstream", tmp / "upstream",
                        run.UPSTREAM_BODY.format(port=up, dir=tmp / "upstream"), run.LOAD_CORE, [up])
        config = run.aisix_config(tmp / "aisix", "127.0.0.1:0", up, up, f"127.0.0.1:{run.free_port()}")
        proc, port = run.start_aisix("aisix", config, run.PROXY_CORE)
        run.wrk(port, ROUTE, 2, models=MODELS)  # warm up
        raw = Path(os.environ.get("PROFILE_RAW") or tmp / "stacks.txt")
        spy_out: list[str] = []
        # PROFILE_NATIVE=1: C frames too (system calls, the allocator), sampled with the process
        # stopped, which slows it; the default samples without stopping it, Python frames only.
        how = ["--native"] if NATIVE else ["--nonblocking"]
        sampler = subprocess.Popen([*run.cpu_list(run.LOAD_CORE), spy, "record", "--format", "raw", "--rate", "250",
                                    *how, "--duration", str(SECONDS), "--pid", str(proc.pid), "--output", str(raw)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        reader = threading.Thread(target=lambda: spy_out.extend(sampler.stdout or []), daemon=True)
        reader.start()
        r = run.wrk(port, ROUTE, SECONDS, watch=[proc.pid], models=MODELS)
        sampler.wait(SECONDS + 30)
        reader.join(5)
        print(f"aisix, {ROUTE}, wrk -t1 -c{run.CONNECTIONS} {SECONDS} s: {r.rps:,.0f} req/s, p99 {r.p99_ms:.2f} ms, "
              f"errors {r.errors}, aisix CPU {r.cpu:.0f}% of a core; py-spy at 250 Hz ({how[0][2:]})")
        if sampler.returncode != 0 or not raw.exists():
            print("profile: py-spy failed:\n" + "".join(spy_out[-20:]), file=sys.stderr)
            return 2
        summarise(raw)
        return 0
    except run.BenchError as e:
        print(f"profile: {e}", file=sys.stderr)
        return 2
    finally:
        run.Proc.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        run.Reaper.done()


if __name__ == "__main__":
    sys.exit(main())
