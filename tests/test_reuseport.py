"""One port, several gateway processes (SO_REUSEPORT), as etc/systemd/aisix@.service runs them.

Two real `python -m aisix serve` processes are given the same proxy.listen; the kernel spreads
new connections between them. The responses do not say which process answered, so each
process's access log is the witness. Each instance has its own metrics port, taken from the
environment as the aisix@.service template does (Environment=AISIX_METRICS_PORT=%i).
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.fakes import FakeUpstream
from tests.gateway import Gateway

CONNECTIONS = 200
METRICS_FROM_ENV = "127.0.0.1:${AISIX_METRICS_PORT}"  # as docs/operations.md tells operators


@pytest.fixture
def shared_port() -> Iterator[int]:
    """A free port, held for the whole test by a bound (not listening) SO_REUSEPORT socket.

    Holding it keeps the kernel from handing the port to anyone else binding port 0 meanwhile;
    not listening keeps this socket out of the group that connections are spread over, and
    SO_REUSEPORT lets the gateways (same user, also SO_REUSEPORT) bind beside it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


def free_port() -> int:
    """A port free right now (a metrics listener must get its own; it cannot be held like above)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def instances(tmp_path: Path, fake: FakeUpstream, port: int, metrics_ports: list[int],
              monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Gateway]]:
    """Gateways on one proxy port, the i-th with AISIX_METRICS_PORT=metrics_ports[i]."""
    started: list[Gateway] = []
    try:
        for i, metrics_port in enumerate(metrics_ports):
            d = tmp_path / f"instance{i}"
            d.mkdir()
            monkeypatch.setenv("AISIX_METRICS_PORT", str(metrics_port))  # Gateway.start passes os.environ on
            gw = Gateway(d, fake.base_url, {"proxy": {"listen": f"127.0.0.1:{port}"},
                                             "metrics": {"listen": METRICS_FROM_ENV},
                                             "access_log": {"probes": True}})  # the witness
            started.append(gw)
            gw.start()
        yield started
    finally:
        for gw in started:
            gw.stop()


def served(gw: Gateway, path: str) -> int:
    """How many GET path requests this process's access log shows."""
    request = re.compile(f'"GET {re.escape(path)}[ "]')  # with or without the HTTP version
    return sum(bool(request.search(line)) for line in gw.lines)


async def test_two_processes_on_one_port_both_serve(
        tmp_path: Path, fake: FakeUpstream, shared_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    metrics_ports = [free_port(), free_port()]
    with instances(tmp_path, fake, shared_port, metrics_ports, monkeypatch) as gateways:
        assert all(gw.url == f"http://127.0.0.1:{shared_port}" for gw in gateways)
        # A new connection per request: the kernel picks a listener per connection, not per request.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(CONNECTIONS):
                async with session.get(f"http://127.0.0.1:{shared_port}/livez") as answer:
                    assert answer.status == 200

        deadline = time.monotonic() + 10  # access-log lines reach our reader after the answers
        while sum(served(gw, "/livez") for gw in gateways) < CONNECTIONS and time.monotonic() < deadline:
            time.sleep(0.02)
        counts = [served(gw, "/livez") for gw in gateways]
        assert sum(counts) == CONNECTIONS, counts
        # Both served: all 200 on one of them by chance is a 2**-199 event.
        assert min(counts) > 0, counts

        # Each instance has its own metrics listener, from the environment.
        for gw, metrics_port in zip(gateways, metrics_ports):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
                assert answer.status == 200
            assert served(gw, "/livez") > 0  # still up

        # One instance leaving does not take the port with it.
        assert gateways[0].stop() == 0
        for _ in range(20):
            with urllib.request.urlopen(f"http://127.0.0.1:{shared_port}/livez", timeout=5) as answer:
                assert answer.status == 200


def test_instances_cannot_share_a_metrics_port(
        tmp_path: Path, fake: FakeUpstream, shared_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """SO_REUSEPORT is for the API port only. On the metrics port it would let a second instance
    bind silently, and each scrape would read the counters of whichever process the kernel picked
    (counters that jump back and forth): a forgotten per-instance port must fail the start."""
    metrics_port = free_port()
    with instances(tmp_path, fake, shared_port, [metrics_port], monkeypatch) as gateways:
        (tmp_path / "second").mkdir()
        second = Gateway(tmp_path / "second", fake.base_url,
                         {"proxy": {"listen": f"127.0.0.1:{shared_port}"},
                          "metrics": {"listen": f"127.0.0.1:{metrics_port}"}})
        try:
            with contextlib.suppress(RuntimeError):  # it may die before or after its API listener
                second.start()
            assert second.proc is not None
            try:
                code = second.proc.wait(10)
            except subprocess.TimeoutExpired:
                pytest.fail("a second instance on the same metrics port is serving:\n" + second.log())
            assert code == 1, second.log()
            assert "cannot start" in second.log()
        finally:
            second.stop()
        assert gateways[0].proc is not None and gateways[0].proc.poll() is None
