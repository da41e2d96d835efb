"""sd_notify: the datagram systemd gets under Type=notify, and the gateway's READY=1 once it listens."""

from __future__ import annotations

import os
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from aisix.sdnotify import notify
from tests.fakes import FakeUpstream
from tests.gateway import Gateway


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A unix datagram socket standing in for systemd's notify socket, and its address."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        yield sock, path


def test_sends_the_states_as_one_datagram(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    assert notify("READY=1", "STATUS=listening on http://127.0.0.1:3000", env={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening on http://127.0.0.1:3000"


def test_abstract_namespace_address() -> None:
    name = f"aisix-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert notify("STOPPING=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}], ids=["unset", "empty"])
def test_not_under_systemd_is_a_no_op(env: dict[str, str]) -> None:
    assert notify("READY=1", env=env) is False


def test_a_socket_that_is_gone_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert "cannot notify systemd" in caplog.text


def test_unsupported_address_is_not_used(caplog: pytest.LogCaptureFixture) -> None:
    assert notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    assert "unsupported NOTIFY_SOCKET" in caplog.text


def test_gateway_says_ready_once_it_accepts_connections(
        listener: tuple[socket.socket, str], fake: FakeUpstream, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """etc/systemd/aisix.service is Type=notify: without READY=1 systemd would kill the gateway
    when TimeoutStartSec runs out, and `systemctl start` would report a failure."""
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)  # Gateway.start passes os.environ on
    gw = Gateway(tmp_path, fake.base_url).start()
    try:
        try:
            states = sock.recv(4096).decode().split("\n")
        except TimeoutError:
            pytest.fail("no READY=1 from the gateway within 10 s:\n" + gw.log())
        assert "READY=1" in states
        with urllib.request.urlopen(gw.url + "/livez", timeout=5) as answer:  # listening by then
            assert answer.status == 200
    finally:
        assert gw.stop() == 0
