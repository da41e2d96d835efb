"""`make bench-ab REF=<commit>`: what a change costs per request, A (a commit) against B (the tree).

The req/s ratio of `make bench` moves by about +-0.1 between runs on a shared machine; a single
optimisation is often worth less. This measures the steadier figure underneath it: the CPU time
the gateway's process spends per request (utime + stime from /proc over a fixed wrk run divided
by the requests served), for the bare relay, aisix at REF (a git worktree) and aisix as it is in
this tree, interleaved (relay A B, relay A B, ...) so drift hits all alike. Same stack, config and
pinning as `bench/run.py`, whose helpers it uses.

Environment (all optional): AB_REF (HEAD), AB_ROUNDS (5), AB_SECONDS (4), BENCH_ROUTES, AB_ALIAS
(failover: aisix is sent the aliases with two targets, as `make bench`'s "aisix failover").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run

REF = os.environ.get("AB_REF", "HEAD")
ROUNDS = run._env_int("AB_ROUNDS", 5)
SECONDS = run._env_int("AB_SECONDS", 4)
TARGETS = ("bare", "A", "B")
MODELS = run.MODELS["failover"] if os.environ.get("AB_ALIAS") == "failover" else run.PLAIN_MODELS


def start_aisix_at(name: str, tree: Path, config: Path) -> tuple[run.Proc, int]:
    """aisix from tree's sources, whatever the venv has installed."""
    code = f"import sys, runpy; sys.path.insert(0, {str(tree)!r}); runpy.run_module('aisix', run_name='__main__')"
    proc = run.Proc(name, [sys.executable, "-c", code, "serve", "-c", str(config)],  # access log on, as shipped
                    run.PROXY_CORE, config.parent / f"{name}.log")
    m = proc.wait_for(r"aisix listening on http://[^\s:]+:(\d+)")
    return proc, int(m.group(1))


def main() -> int:
    if run.HAVE_TWO_CORES:
        os.sched_setaffinity(0, run.LOAD_CORE)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))
    signal.alarm(len(run.ROUTES) * len(TARGETS) * (ROUNDS * SECONDS + 2) * 2 + 120)
    sha = subprocess.run(["git", "rev-parse", "--short", REF], cwd=run.ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="aisix-ab-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    run.Reaper.start(tmp)
    tree = tmp / "ref"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), sha], cwd=run.ROOT, check=True)
    try:
        if "transcription-mp3" in run.ROUTES:  # the file wrk sends, as bench/run.py makes it
            run.REAL_MP3_PATH = run.make_real_mp3(tmp)
        up = run.free_port()
        run.write_upstream_root(tmp / "upstream" / "root")
        run.start_nginx("nginx upstream", tmp / "upstream",
                        run.UPSTREAM_BODY.format(port=up, dir=tmp / "upstream"), run.LOAD_CORE, [up])
        bare = run.Proc("bare relay", [sys.executable, str(run.HERE / "bare_relay.py"), "--listen", "127.0.0.1:0",
                                       "--upstream", f"http://127.0.0.1:{up}"], run.PROXY_CORE, tmp / "bare.log")
        procs = {"bare": bare}
        ports = {"bare": int(bare.wait_for(r"listening on http://[^\s:]+:(\d+)").group(1))}
        for name, src in (("A", tree), ("B", run.ROOT)):
            config = run.aisix_config(tmp / name, "127.0.0.1:0", up, up, f"127.0.0.1:{run.free_port()}")
            procs[name], ports[name] = start_aisix_at(name, src, config)
        print(f"A = aisix at {sha} ({REF}), B = this tree; {ROUNDS} rounds x {SECONDS} s, wrk -t1 "
              f"-c{run.CONNECTIONS}, aliases {', '.join(MODELS)}; CPU us per request of the target's process "
              "(lower is better)")
        for route in run.ROUTES:
            for t in TARGETS:
                run.wrk(ports[t], route, 1, models=MODELS)  # warm up
            cost: dict[str, list[float]] = {t: [] for t in TARGETS}
            rps: dict[str, list[float]] = {t: [] for t in TARGETS}
            for _ in range(ROUNDS):
                for t in TARGETS:
                    before = run.cpu_seconds([procs[t].pid])
                    r = run.wrk(ports[t], route, SECONDS, models=MODELS)
                    used = run.cpu_seconds([procs[t].pid]) - before
                    if r.errors:
                        raise run.BenchError(f"{t}: {r.errors} errors on {route}")
                    cost[t].append(used / (r.rps * SECONDS) * 1e6)
                    rps[t].append(r.rps)
            m = {t: run.med(cost[t]) for t in TARGETS}
            print(f"{route}:")
            for t in TARGETS:
                print(f"  {t:<5} {m[t]:7.1f} us/req  (" + " ".join(f"{c:.0f}" for c in cost[t])
                      + f")  {run.med(rps[t]):8,.0f} req/s")
            print(f"  B/A {m['B'] / m['A']:.3f}   relay/A {m['bare'] / m['A']:.3f}   relay/B {m['bare'] / m['B']:.3f}")
        return 0
    finally:
        run.Proc.stop_all()
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=run.ROOT)
        subprocess.run(["rm", "-rf", str(tmp)])


if __name__ == "__main__":
    sys.exit(main())
