"""The `aisix` command, run for real as `python -m aisix` in a subprocess with an empty environment."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "etc" / "aisix" / "config.yaml"


def aisix(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    # No environment variable at all: the shipped files must validate without one.
    result = subprocess.run([sys.executable, "-m", "aisix", *args], input=stdin, capture_output=True,
                            cwd=ROOT, env={}, timeout=60, check=False)
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode(), result.stderr.decode())


def test_validate_the_shipped_files() -> None:
    result = aisix("validate", "-c", str(CONFIG))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"ok: {CONFIG}: 1 provider keys, 3 models, 1 api keys, 0 guardrails\n"


@pytest.mark.parametrize("command", ["validate", "serve"])
def test_a_broken_copy_is_refused(tmp_path: Path, command: str) -> None:
    shutil.copytree(CONFIG.parent, tmp_path, dirs_exist_ok=True)
    with (tmp_path / "resources.yaml").open("a") as f:
        f.write("colour: blue\n")
    settings = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(settings.replace('sink: "stdout"', 'sink: "syslog"'))
    result = aisix(command, "-c", str(tmp_path / "config.yaml"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "config.yaml: usage: field 'sink': must be 'stdout', 'file:<path>' or "
        "'redis://host:port/db?stream=<name>'",
        "resources.yaml: field 'colour': unknown field",
    ]


@pytest.mark.parametrize("command", ["validate", "serve"])
def test_what_only_a_start_finds_is_found_by_validate_and_named_by_serve(tmp_path: Path, command: str) -> None:
    # validate said ok to a listen host that does not resolve and to a file sink in a missing
    # directory; serve then failed with "Name or service not known", naming no field.
    shutil.copytree(CONFIG.parent, tmp_path, dirs_exist_ok=True)
    settings = (tmp_path / "config.yaml").read_text()
    assert 'listen: "127.0.0.1:3000"' in settings
    (tmp_path / "config.yaml").write_text(settings.replace('listen: "127.0.0.1:3000"', 'listen: "no-such-host.invalid:3000"')
                                          .replace('sink: "stdout"', f'sink: "file:{tmp_path}/missing/usage.jsonl"')
                                          .replace('listen: "127.0.0.1:${AISIX_METRICS_PORT:-9090}"', "listen: null"))
    result = aisix(command, "-c", str(tmp_path / "config.yaml"))
    assert result.returncode == 1 and result.stdout == ""
    if command == "validate":
        assert [line.split(" (")[0] for line in result.stderr.splitlines()] == [
            f"{tmp_path}/config.yaml: proxy.listen: 'no-such-host.invalid' does not resolve",
            f"{tmp_path}/config.yaml: usage.sink: directory {tmp_path}/missing does not exist"]
    else:  # serve opens the sink first, then listens: fixed sink, it names the listener
        (tmp_path / "missing").mkdir()
        result = aisix(command, "-c", str(tmp_path / "config.yaml"))
        assert result.returncode == 1
        assert "cannot start: proxy.listen no-such-host.invalid:3000: " in result.stderr
        assert "aisix stopped" not in result.stderr  # it never started (it was said before the reason)


def test_validate_a_missing_file() -> None:
    result = aisix("validate", "-c", "/nonexistent/config.yaml")
    assert result.returncode == 1
    assert result.stderr.startswith("config.yaml: cannot read /nonexistent/config.yaml")


@pytest.mark.parametrize(("stdin", "key"), [
    (b"sk-aisix-demo\n", "sk-aisix-demo"),
    (b"sk-aisix-demo\r\n", "sk-aisix-demo"),
    (b"sk-aisix-demo", "sk-aisix-demo"),
    (b"sk-two-newlines\n\n", "sk-two-newlines\n"),  # only one is stripped
    (b" sk-spaces \n", " sk-spaces "),
    ("sk-\u00e9\n".encode(), "sk-\u00e9"),
])
def test_hash_key(stdin: bytes, key: str) -> None:
    result = aisix("hash-key", stdin=stdin)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == hashlib.sha256(key.encode()).hexdigest() + "\n"


@pytest.mark.parametrize("stdin", [b"", b"\n", b"\r\n", b"\xff\n"])
def test_hash_key_refuses_an_empty_or_undecodable_key(stdin: bytes) -> None:
    result = aisix("hash-key", stdin=stdin)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("aisix hash-key: ")


def test_the_demo_key_matches_the_shipped_key_hash() -> None:
    shipped = (CONFIG.parent / "resources.yaml").read_text()
    assert aisix("hash-key", stdin=b"sk-aisix-demo\n").stdout.strip() in shipped


def test_no_command_is_a_usage_error() -> None:
    result = aisix()
    assert result.returncode == 2 and "usage: aisix" in result.stderr
