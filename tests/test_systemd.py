"""etc/systemd/ units and `make install`: the units parse and hold their hardening, the paths they
name are the ones `make install` creates, and the installed gateway validates its config.

`make install DESTDIR=<tmp>` builds a real venv from this tree (once per module, ~20 s).
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from aisix import limits, realtime
from tests.fakes import FakeUpstream
from tests.gateway import ROOT, TEAM_A, Gateway

# A staged `make install` pip-installs into a new venv (~16 s warm, longer from a cold cache); its
# subprocess has its own 600 s bound, which should fire, and say why, before this one.
pytestmark = pytest.mark.timeout(660)

UNITS = ROOT / "etc" / "systemd"
SINGLE, TEMPLATE = "aisix.service", "aisix@.service"
AISIX = "/opt/aisix/venv/bin/aisix"
CONFIG = "/etc/aisix/config.yaml"

# What each unit must say, as the operations issue asks (docs/operations.md explains each).
REQUIRED = {
    "Unit": {"After": "network-online.target"},
    "Service": {
        "Type": "notify",  # aisix/sdnotify.py sends READY=1 once the listener accepts connections
        "User": "aisix",
        "Group": "aisix",
        "ExecStart": f"{AISIX} serve -c {CONFIG}",
        "ExecReload": "/bin/kill -HUP $MAINPID",  # SIGHUP reloads resources.yaml
        "KillSignal": "SIGTERM",  # drains
        "Restart": "on-failure",
        "EnvironmentFile": "-/etc/aisix/env",
        "LimitNOFILE": "65536",
        "LogsDirectory": "aisix",
        "StateDirectory": "aisix",  # the usage spill, which outlives the process
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",  # uploads are spooled to temp files
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallFilter": "@system-service",
        "CapabilityBoundingSet": "",
    },
    "Install": {"WantedBy": "multi-user.target"},
}
DRAIN_TIMEOUT_S = 60  # proxy.drain_timeout_ms's default
USAGE_FLUSH_S = 10  # UsageSink.close's default timeout


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",),
                                       comment_prefixes=("#", ";"), empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string((UNITS / name).read_text())
    return parser


@pytest.mark.parametrize("name", [SINGLE, TEMPLATE])
def test_unit_has_the_required_settings(name: str) -> None:
    parsed = unit(name)
    for section, keys in REQUIRED.items():
        for key, value in keys.items():
            assert parsed.get(section, key, fallback=None) == value, f"{name}: [{section}] {key}"
    stop = int(parsed.get("Service", "TimeoutStopSec").removesuffix("s"))
    after_drain = realtime.CLOSE_TIMEOUT_S + limits.GIVE_BACK_S + USAGE_FLUSH_S
    assert stop > DRAIN_TIMEOUT_S + after_drain, "systemd would SIGKILL a gateway still draining"


def test_every_setting_says_why() -> None:
    """A setting follows a comment, or another setting of the group a comment explains: never a
    blank line or a section header."""
    for name in (SINGLE, TEMPLATE):
        previous = ""
        for number, line in enumerate((UNITS / name).read_text().splitlines(), 1):
            if line and not line.startswith(("#", "[")):
                assert previous and not previous.startswith("["), f"{name}:{number}: no comment says why"
            previous = line


def test_template_differs_only_by_its_instance() -> None:
    """aisix@.service is aisix.service plus the instance's metrics port: hardening cannot drift."""
    single, template = unit(SINGLE), unit(TEMPLATE)
    assert template.get("Service", "Environment") == "AISIX_METRICS_PORT=%i"
    assert "%i" in template.get("Unit", "Description")
    for section in single.sections():
        a, b = dict(single.items(section)), dict(template.items(section))
        b.pop("Environment", None)
        a.pop("Description", None), b.pop("Description", None)
        assert a == b, section


def test_instance_metrics_port_comes_from_the_environment(tmp_path: Path) -> None:
    """The config the template's comments and docs/operations.md show: one file for every
    instance, 9090 when AISIX_METRICS_PORT is unset (aisix.service, `aisix validate`)."""
    text = (ROOT / "etc" / "aisix" / "config.yaml").read_text()
    text, n = re.subn(r'(?m)^(  listen: )"127\.0\.0\.1:9090"', r'\1"127.0.0.1:${AISIX_METRICS_PORT:-9090}"', text)
    if n == 0:  # the shipped config already reads the variable
        assert "${AISIX_METRICS_PORT:-9090}" in text
    (tmp_path / "config.yaml").write_text(text)
    shutil.copy(ROOT / "etc" / "aisix" / "resources.yaml", tmp_path)
    code = "import sys; from aisix import config; print(config.load(sys.argv[1]).settings.metrics_listen.port)"
    for env, port in (({"AISIX_METRICS_PORT": "9093"}, "9093"), ({}, "9090")):
        run_env = {k: v for k, v in os.environ.items() if k != "AISIX_METRICS_PORT"} | env
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "config.yaml")], cwd=ROOT,
                             env=run_env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == port


# -- make install DESTDIR=... -------------------------------------------------------------------

@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A staged install; the operator's resources.yaml is already there and must survive."""
    assert shutil.which("make") is not None, "make runs this suite (make test)"
    root = tmp_path_factory.mktemp("destdir")
    (root / "etc" / "aisix").mkdir(parents=True)
    ours = (ROOT / "etc" / "aisix" / "resources.yaml").read_text() + "# the operator's own edit\n"
    (root / "etc" / "aisix" / "resources.yaml").write_text(ours)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    done = subprocess.run(["make", "--no-print-directory", "install", f"DESTDIR={root}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    yield root


def test_install_lays_out_the_tree(installed: Path) -> None:
    for name in (SINGLE, TEMPLATE):  # default PREFIX and SYSCONFDIR: the units as shipped
        assert (installed / "etc/systemd/system" / name).read_text() == (UNITS / name).read_text()
    assert os.access(installed / AISIX.lstrip("/"), os.X_OK), "ExecStart names what make install made"
    etc = installed / "etc/aisix"
    assert (etc / "config.yaml").read_text() == (ROOT / "etc/aisix/config.yaml").read_text()
    assert (etc / "resources.yaml").read_text().endswith("# the operator's own edit\n"), "overwritten"
    assert stat.S_IMODE((etc / "config.yaml").stat().st_mode) == 0o640
    assert stat.S_IMODE((etc / "env").stat().st_mode) == 0o600  # provider keys
    assert (installed / "var/log/aisix").is_dir()
    assert (installed / "opt/aisix/share/doc/operations.md").is_file()


def test_installed_gateway_validates_the_installed_config(installed: Path) -> None:
    done = subprocess.run([str(installed / AISIX.lstrip("/")), "validate", "-c", str(installed / CONFIG.lstrip("/"))],
                          capture_output=True, text=True, timeout=60, env={"PATH": os.environ.get("PATH", "")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: ")


def test_systemd_accepts_the_installed_units(installed: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify` with ExecStart pointed into the staged tree (verify checks that
    the command exists); any warning (an unknown key, a misplaced one) fails the test."""
    for name in (SINGLE, TEMPLATE):
        text = (installed / "etc/systemd/system" / name).read_text()
        (tmp_path / name).write_text(text.replace(AISIX, str(installed / AISIX.lstrip("/"))))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / SINGLE),
                           str(tmp_path / "aisix@9091.service")],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(tmp_path / SINGLE)],
                              capture_output=True, text=True, timeout=60)
    level = re.search(r"Overall exposure level for aisix\.service: ([\d.]+)", security.stdout)
    if level:  # systemd >= 250
        assert float(level.group(1)) <= 2.0, security.stdout


# -- MemoryDenyWriteExecute=yes -----------------------------------------------------------------

async def test_gateway_needs_no_writable_executable_memory(gateway: Gateway, fake: FakeUpstream) -> None:
    """Under MemoryDenyWriteExecute=yes, making memory both writable and executable fails. A
    gateway that has served every route (the upload spooled, since `file` comes first) has no
    such mapping, so nothing it runs (CPython, aiohttp, orjson, yarl, multidict) needs one."""
    auth = {"Authorization": f"Bearer {TEAM_A}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/audio/speech", headers=auth,
                          json={"model": "tts-prod", "input": "hi", "voice": "alloy"}) as r:
            assert r.status == 200
            await r.read()
        form = aiohttp.FormData()
        form.add_field("file", b"\xff\xf3" * 40000, filename="a.mp3", content_type="audio/mpeg")
        form.add_field("model", "whisper-prod")
        async with s.post(gateway.url + "/v1/audio/transcriptions", headers=auth, data=form) as r:
            assert r.status == 200
        async with s.get(gateway.url + "/v1/models", headers=auth) as r:
            assert r.status == 200
    maps = Path(f"/proc/{gateway.pid}/maps").read_text().splitlines()
    wx = [line for line in maps if "w" in line.split()[1] and "x" in line.split()[1]]
    assert wx == []
