"""A real gateway process for the tests: its own config files, its own port, its logs kept.

The test learns the port from the "listening on" log line (no polling, no sleeps) and keeps
draining stderr in a thread so logging can never block the gateway.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from aisix.config import hash_key

ROOT = Path(__file__).resolve().parent.parent
PROVIDER_SECRET = "sk-provider-secret-0123456789"
KEYS = {  # caller key -> (display_name, extra fields)
    "sk-team-a-secret": ("team-a", {"allowed_models": ["tts-*", "whisper-*"]}),
    "sk-restricted-secret": ("restricted", {"allowed_models": ["whisper-prod"]}),
    "sk-disabled-secret": ("off", {"allowed_models": ["*"], "disabled": True}),
    "sk-expired-secret": ("old", {"allowed_models": ["*"], "expires_at": "2020-01-01T00:00:00Z"}),
}
TEAM_A = "sk-team-a-secret"
# What must never be written by a gateway: caller keys (any "sk-…" the tests send), the provider
# key, and prompt text the tests send ("Hello there" is the speech input of many tests).
LEAKS = re.compile(r"\bsk-[a-z]|" + re.escape(PROVIDER_SECRET) + r"|Hello there|hunter2|PassWord")
_LISTENING = re.compile(r"aisix listening on (http://\S+)")
_METRICS = re.compile(r"aisix metrics listening on (http://\S+)")


def resources(upstream_base: str, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "provider_keys": [{"display_name": "fake", "provider": "openai", "api_base": upstream_base,
                           "api_key": PROVIDER_SECRET}],
        "models": [
            {"display_name": "tts-prod", "provider_key": "fake", "model_name": "gpt-4o-mini-tts",
             "routes": ["speech"]},
            {"display_name": "whisper-prod", "provider_key": "fake", "model_name": "whisper-1",
             "routes": ["transcriptions", "translations"]},
            {"display_name": "secret-model", "provider_key": "fake", "model_name": "gpt-secret"},
        ],
        "api_keys": [{"display_name": name, "key_hash": hash_key(key), **fields}
                     for key, (name, fields) in KEYS.items()],
    }
    for section, items in extra.items():
        doc.setdefault(section, []).extend(items) if isinstance(items, list) else doc.update({section: items})
    return doc


class Gateway:
    started: list[Gateway] = []  # every gateway of the session, for the final scan for leaks

    def __init__(self, tmp: Path, upstream_base: str, settings: dict[str, Any] | None = None,
                 **resource_extra: Any) -> None:
        self.dir = tmp
        self.usage_file = tmp / "usage.jsonl"
        config = {"proxy": {"listen": "127.0.0.1:0"}, "metrics": {"listen": None},
                  "usage": {"sink": f"file:{self.usage_file}"}, "resources_file": "resources.yaml"}
        for section, values in (settings or {}).items():
            config.setdefault(section, {}).update(values)
        (tmp / "config.yaml").write_text(yaml.safe_dump(config))
        (tmp / "resources.yaml").write_text(yaml.safe_dump(resources(upstream_base, **resource_extra)))
        self.lines: list[str] = []
        self.url = ""
        self.metrics_url = ""
        self.args: list[str] = []
        self.env: dict[str, str] = {}
        self.stdout: int | None = None  # a file descriptor for the process's stdout; None: /dev/null
        self.proc: subprocess.Popen[str] | None = None
        self._drain = threading.Thread()

    def start(self, timeout: float = 20.0) -> Gateway:
        Gateway.started.append(self)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aisix", "serve", "-c", str(self.dir / "config.yaml"), *self.args],
            cwd=ROOT, stdout=subprocess.DEVNULL if self.stdout is None else self.stdout, stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        found = threading.Event()

        def drain() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                m = _METRICS.search(line)
                if m:
                    self.metrics_url = m.group(1)
                m = _LISTENING.search(line)
                if m and not self.url:
                    self.url = m.group(1)
                    found.set()
            found.set()  # the process ended

        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()
        found.wait(timeout)
        if not self.url:
            self.stop()
            raise RuntimeError("gateway did not start:\n" + "".join(self.lines))
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self) -> int:
        return _status_kib(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        return _status_kib(self.pid, "VmHWM")

    def reset_peak(self) -> None:
        """Make VmHWM start again from the current RSS (Linux: write 5 to clear_refs)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drain.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode

    def events(self, n: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The usage events written so far, once there are at least n (they are written after
        the answer, off the request path, so a test waits for them)."""
        deadline = time.monotonic() + timeout
        while True:
            data = self.usage_file.read_bytes() if self.usage_file.exists() else b""
            lines = data[:data.rfind(b"\n") + 1].splitlines()  # a line still being written is not one yet
            if len(lines) >= n:
                return [orjson.loads(line) for line in lines]
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(lines)} usage events, wanted {n}:\n{self.log()}")
            time.sleep(0.02)  # polling a file for a condition, bounded by the deadline

    def event(self, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The one usage event of a request; fails if there are none or several."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(0) if e["request_id"] == request_id]
            if found or time.monotonic() > deadline:
                assert len(found) == 1, f"{len(found)} usage events for {request_id}"
                return found[0]
            time.sleep(0.02)

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """Block until a log line containing text appears; that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line with {text!r}:\n{self.log()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log(self) -> str:
        return "".join(self.lines)


def fd_targets(pid: int) -> list[str]:
    """What each of the process's file descriptors points at ("socket:[inode]", a path, ...)."""
    targets = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:  # closed while we looked
            continue
    return targets


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")
