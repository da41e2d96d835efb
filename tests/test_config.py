"""config.py: the shipped files, every kind of problem, ${VAR} substitution, secrets, indexes."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from aisix import config
from aisix.config import ConfigError, Listen

ETC = Path(__file__).resolve().parent.parent / "etc" / "aisix"
DELETE = object()


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


RESOURCES: dict[str, Any] = {
    "_format_version": "1",
    "provider_keys": [
        {"display_name": "openai-main", "provider": "openai",
         "api_base": "https://api.openai.com/v1/", "api_key": "sk-provider-secret"},
    ],
    "models": [
        {"display_name": "tts-prod", "provider_key": "openai-main", "model_name": "gpt-4o-mini-tts",
         "routes": ["speech"], "timeout": 120000, "rate_limit": {"rpm": 600, "concurrency": 32}},
        {"display_name": "whisper-prod", "provider_key": "openai-main", "model_name": "whisper-1"},
    ],
    "api_keys": [
        {"display_name": "team-a", "key_hash": sha("sk-team-a"), "allowed_models": ["tts-*"],
         "rate_limit": {"rpm": 60, "tpm": 100000}, "disabled": False,
         "expires_at": "2027-01-01T00:00:00Z"},
    ],
    "guardrails": [
        {"name": "no-secrets", "kind": "keyword", "models": ["*"], "hook_point": "input",
         "enforcement_mode": "block",
         "patterns": [{"kind": "literal", "value": "password"}, {"kind": "regex", "value": r"\b\d{16}\b"}]},
    ],
}


def patched(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """doc with each "a.0.b" path set (an index one past the end appends; DELETE removes)."""
    doc = copy.deepcopy(doc)
    for path, value in changes.items():
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = doc
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[last]
        elif isinstance(node, list) and last == len(node):
            node.append(value)
        else:
            node[last] = value
    return doc


def write(tmp_path: Path, settings: dict[str, Any] | str | None = None,
          resources: dict[str, Any] | str | None = None) -> Path:
    """A config.yaml and resources.yaml in tmp_path; dicts are dumped, strings written as they are."""
    files = {"config.yaml": settings or {}, "resources.yaml": RESOURCES if resources is None else resources}
    for name, doc in files.items():
        (tmp_path / name).write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return tmp_path / "config.yaml"


def problems(path: Path, env: dict[str, str] | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        config.load(path, env or {})
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


# -- the shipped files ------------------------------------------------------------------------


def test_shipped_files_load_with_an_empty_environment() -> None:
    loaded = config.load(ETC / "config.yaml", {})
    s, r = loaded.settings, loaded.resources
    assert s.proxy.listen == Listen("127.0.0.1", 3000)
    assert s.metrics_listen == Listen("127.0.0.1", 9090)
    assert s.proxy.realtime_heartbeat_ms == 30000
    assert (str(s.usage_sink), str(s.ratelimit_backend)) == ("stdout", "memory")
    assert s.resources_file == ETC / "resources.yaml"
    assert set(r.models) == {"tts-prod", "whisper-prod", "whisper-live"}
    assert r.models["tts-prod"].targets[0].urls["speech"] == "http://127.0.0.1:3001/v1/audio/speech"
    assert r.models["whisper-prod"].targets[0].model_name == "whisper-1"
    demo = r.keys_by_hash[sha("sk-aisix-demo")]
    assert demo.name == "demo" and demo.allowed_sorted == ("tts-prod", "whisper-live", "whisper-prod")
    assert r.guardrails == ()


def test_shipped_config_equals_the_defaults(tmp_path: Path) -> None:
    """Each key in etc/aisix/config.yaml shows its default: an empty file must mean the same."""
    shipped = config.load_settings(ETC / "config.yaml", {})
    (tmp_path / "config.yaml").write_text("")
    empty = config.load_settings(tmp_path / "config.yaml", {})
    assert dataclasses.replace(empty, resources_file=shipped.resources_file, config_file=shipped.config_file,
                               usage_spill_dir=shipped.usage_spill_dir) == shipped
    assert empty.usage_spill_dir == tmp_path / "usage-spill"  # beside config.yaml without systemd


def uncommented(first: str) -> str:
    """The commented-out block of the shipped resources.yaml whose first line contains `first`."""
    lines = (ETC / "resources.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if first in line)
    block = []
    for line in lines[start:]:
        if not line.lstrip().startswith("#"):
            break
        block.append(line.replace("# ", "", 1))
    return "\n".join(block) + "\n"


def test_shipped_guardrail_example_validates(tmp_path: Path) -> None:
    shipped = (ETC / "resources.yaml").read_text()
    path = write(tmp_path, resources=shipped + "\n" + uncommented("# guardrails:"))
    (guardrail,) = config.load(path, {}).resources.guardrails
    assert guardrail.name == "no-secrets" and guardrail.applies_to == {"tts-prod", "whisper-prod", "whisper-live"}
    literal, regex = guardrail.patterns
    assert literal.regex.search("my PassWord") and regex.regex.search("card 1234567812345678")


def test_shipped_cors_example_validates(tmp_path: Path) -> None:
    shipped = (ETC / "config.yaml").read_text()
    example = "  # cors:\n  #   allowed_origins:"
    assert example in shipped
    (tmp_path / "config.yaml").write_text(shipped.replace(example, "  cors:\n    allowed_origins:"))
    cors = config.load_settings(tmp_path / "config.yaml", {}).proxy.cors
    assert cors is not None and "https://app.example.com" in cors.origins


def test_shipped_openai_example_needs_its_variable(tmp_path: Path) -> None:
    doc = yaml.safe_load((ETC / "resources.yaml").read_text())
    doc["provider_keys"] = yaml.safe_load(uncommented("# - display_name: dev-upstream"))
    path = write(tmp_path, resources=doc)
    key = config.load(path, {"OPENAI_API_KEY": "sk-real"}).resources.models["tts-prod"].provider_key
    assert (key.api_base, key.auth_header) == ("https://api.openai.com/v1", "Authorization: Bearer sk-real")
    assert problems(path) == ("resources.yaml: provider_keys[dev-upstream]: field 'api_key': "
                              "environment variable 'OPENAI_API_KEY' is not set",)


# -- resources.yaml: every kind of problem names file, resource and field ------------------------

TEAM_B = {"display_name": "team-b", "key_hash": sha("sk-team-b")}

RESOURCE_PROBLEMS = [
    ({"extra": 1}, "resources.yaml: field 'extra': unknown field"),
    ({"models.0.timeuot": 5}, "resources.yaml: models[tts-prod]: field 'timeuot': unknown field"),
    ({"models.0.rate_limit.rpx": 5}, "resources.yaml: models[tts-prod]: field 'rate_limit.rpx': unknown field"),
    ({"guardrails.0.patterns.1.flags": "i"},
     "resources.yaml: guardrails[no-secrets]: field 'patterns[1].flags': unknown field"),
    ({"_format_version": "2"}, "resources.yaml: field '_format_version': must be \"1\""),
    ({"models": {"tts-prod": {}}}, "resources.yaml: field 'models': must be a list, got a mapping"),
    ({"models.1": "whisper-prod"}, "resources.yaml: models[1]: must be a mapping, got a string"),
    ({"models.1.display_name": DELETE}, "resources.yaml: models[1]: field 'display_name': required"),
    ({"models.0.model_name": DELETE}, "resources.yaml: models[tts-prod]: field 'model_name': required"),
    ({"models.0.model_name": ""}, "resources.yaml: models[tts-prod]: field 'model_name': must not be empty"),
    ({"models.0.timeout": "120000"},
     "resources.yaml: models[tts-prod]: field 'timeout': must be a positive integer, got a string"),
    ({"models.0.timeout": True},
     "resources.yaml: models[tts-prod]: field 'timeout': must be a positive integer, got a boolean"),
    ({"models.0.timeout": 1.5}, "resources.yaml: models[tts-prod]: field 'timeout': must be a positive integer"),
    ({"models.0.rate_limit": 600}, "resources.yaml: models[tts-prod]: field 'rate_limit': must be a mapping"),
    ({"models.0.rate_limit.concurrency": 0},
     "resources.yaml: models[tts-prod]: field 'rate_limit.concurrency': must be a positive integer, got 0"),
    ({"api_keys.0.rate_limit.rpm": True},
     "resources.yaml: api_keys[team-a]: field 'rate_limit.rpm': must be a positive integer, got a boolean"),
    ({"models.0.provider_key": "nope"},
     "resources.yaml: models[tts-prod]: field 'provider_key': no provider key named 'nope'"),
    ({"provider_keys.0.api_base": "ftp://api.openai.com/v1"},
     "resources.yaml: provider_keys[openai-main]: field 'api_base': must be an http:// or https:// URL"),
    ({"provider_keys.0.api_base": "https://api.openai.com/v1?x=1"},
     "resources.yaml: provider_keys[openai-main]: field 'api_base': must be an http:// or https:// URL"),
    ({"provider_keys.0.api_base": "http://[::1:3001/v1"},
     "resources.yaml: provider_keys[openai-main]: field 'api_base': must be an http:// or https:// URL"),
    ({"provider_keys.0.api_base": "http://localhost:99999/v1"},
     "resources.yaml: provider_keys[openai-main]: field 'api_base': must be an http:// or https:// URL"),
    ({"provider_keys.0.api_base": "https://user:pw@api.openai.com/v1"},  # they were dropped, silently
     "resources.yaml: provider_keys[openai-main]: field 'api_base': must not hold credentials"),
    ({"models.0.pricing": {"per_minute_input_audio": "6e-3"}},
     "resources.yaml: models[tts-prod]: field 'pricing.per_minute_input_audio': must be a number >= 0 (USD), "
     "got a string that reads as a number (YAML takes 6e-3 as text: write 0.006 or 6.0e-3)"),
    ({"provider_keys.0.provider": 1},
     "resources.yaml: provider_keys[openai-main]: field 'provider': must be a string, got 1"),
    ({"provider_keys.0.provider": "opnai"},
     "resources.yaml: provider_keys[openai-main]: field 'provider': must be one of 'openai'"),
    ({"models.0.routes": ["speech", "transcription"]},
     "resources.yaml: models[tts-prod]: field 'routes': must be a non-empty list of 'speech', 'transcriptions', "
     "'translations', 'realtime'"),
    ({"models.0.routes": []}, "resources.yaml: models[tts-prod]: field 'routes': must be a non-empty list"),
    ({"models.0.targets": [{"provider_key": "openai-main", "model_name": "x"}]},
     "resources.yaml: models[tts-prod]: field 'provider_key': exactly one of provider_key (with model_name) or "
     "targets is required, both were given"),
    ({"models.0.provider_key": DELETE},
     "resources.yaml: models[tts-prod]: field 'provider_key': exactly one of provider_key (with model_name) or "
     "targets is required, neither was given"),
    ({"models.1": {"display_name": "whisper-prod", "targets": []}},
     "resources.yaml: models[whisper-prod]: field 'targets': must be a non-empty list"),
    ({"models.1": {"display_name": "whisper-prod", "model_name": "w", "targets": [
        {"provider_key": "openai-main", "model_name": "whisper-1"}]}},
     "resources.yaml: models[whisper-prod]: field 'model_name': goes in each of targets"),
    ({"models.1": {"display_name": "whisper-prod", "targets": [{"provider_key": "nope", "model_name": "w"}]}},
     "resources.yaml: models[whisper-prod]: field 'targets[0].provider_key': no provider key named 'nope'"),
    ({"models.1": {"display_name": "whisper-prod", "targets": [{"provider_key": "openai-main"}]}},
     "resources.yaml: models[whisper-prod]: field 'targets[0].model_name': required"),
    ({"models.1": {"display_name": "whisper-prod", "targets": [
        {"provider_key": "openai-main", "model_name": "w", "weight": 0}]}},
     "resources.yaml: models[whisper-prod]: field 'targets[0].weight': must be a positive integer"),
    ({"models.1": {"display_name": "whisper-prod", "targets": [
        {"provider_key": "openai-main", "model_name": "w", "priority": -1}]}},
     "resources.yaml: models[whisper-prod]: field 'targets[0].priority': must be an integer >= 0"),
    ({"models.1": {"display_name": "whisper-prod", "targets": [
        {"provider_key": "openai-main", "model_name": "w", "region": "east"}]}},
     "resources.yaml: models[whisper-prod]: field 'targets[0].region': unknown field"),
    ({"models.1": {"display_name": "whisper-prod", "targets": [
        {"provider_key": "openai-main", "model_name": "w"}, {"provider_key": "openai-main", "model_name": "w"}]}},
     "resources.yaml: models[whisper-prod]: field 'targets': each target must be a different provider_key"),
    ({"models.0.retry": {"max_attempts": 0}},
     "resources.yaml: models[tts-prod]: field 'retry.max_attempts': must be a positive integer, got 0"),
    ({"models.0.retry": {"replay_limit_bytes": -1}},
     "resources.yaml: models[tts-prod]: field 'retry.replay_limit_bytes': must be an integer >= 0"),
    ({"models.0.retry": {"attempts": 2}}, "resources.yaml: models[tts-prod]: field 'retry.attempts': unknown field"),
    ({"models.0.cooldown": {"failures": 0}},
     "resources.yaml: models[tts-prod]: field 'cooldown.failures': must be a positive integer, got 0"),
    ({"provider_keys.0.provider": "azure"},
     "resources.yaml: provider_keys[openai-main]: field 'api_version': required for provider azure"),
    ({"provider_keys.0.api_version": "2024-10-21"},
     "resources.yaml: provider_keys[openai-main]: field 'api_version': must be given only for provider azure"),
    ({"provider_keys.0.provider": "azure", "provider_keys.0.api_version": "2024"},
     "resources.yaml: provider_keys[openai-main]: field 'api_version': must be \"v1\" or a version"),
    ({"provider_keys.0.rate_limit": {"rpm": 0}},
     "resources.yaml: provider_keys[openai-main]: field 'rate_limit.rpm': must be a positive integer, got 0"),
    ({"models.0.routes": "speech"},
     "resources.yaml: models[tts-prod]: field 'routes': must be a list of strings, got a string"),
    ({"provider_keys.1": RESOURCES["provider_keys"][0]},
     "resources.yaml: provider_keys[openai-main]: field 'display_name': duplicate: provider_keys[0]"),
    ({"models.2": RESOURCES["models"][1]},
     "resources.yaml: models[whisper-prod]: field 'display_name': duplicate: models[1]"),
    ({"api_keys.1": {**TEAM_B, "display_name": "team-a"}},
     "resources.yaml: api_keys[team-a]: field 'display_name': duplicate: api_keys[0]"),
    ({"guardrails.1": RESOURCES["guardrails"][0]},
     "resources.yaml: guardrails[no-secrets]: field 'name': duplicate: guardrails[0]"),
    ({"api_keys.1": {**TEAM_B, "key_hash": sha("sk-team-a").upper()}},
     "resources.yaml: api_keys[team-b]: same caller key (key_hash/key_env) as api_keys[team-a]"),
    ({"api_keys.0.allowed_models": "tts-*"},
     "resources.yaml: api_keys[team-a]: field 'allowed_models': must be a list of strings, got a string"),
    ({"api_keys.0.allowed_models": ["tts-*", 7]},
     "resources.yaml: api_keys[team-a]: field 'allowed_models': must be a list of strings"),
    ({"guardrails.0.models": "*"},
     "resources.yaml: guardrails[no-secrets]: field 'models': must be a list of strings"),
    ({"api_keys.0.key_env": "TEAM_A_KEY"},
     "resources.yaml: api_keys[team-a]: field 'key_hash': exactly one of key_hash or key_env is required, "
     "both"),
    ({"api_keys.0.key_hash": DELETE},
     "resources.yaml: api_keys[team-a]: field 'key_hash': exactly one of key_hash or key_env is required, "
     "neither"),
    ({"api_keys.0.key_hash": "abc123"}, "resources.yaml: api_keys[team-a]: field 'key_hash': must be 64 hex digits"),
    ({"api_keys.1": {"display_name": "team-b", "key_env": "TEAM_B_KEY"}},
     "resources.yaml: api_keys[team-b]: field 'key_env': environment variable 'TEAM_B_KEY' is not set"),
    ({"api_keys.0.disabled": "no"}, "resources.yaml: api_keys[team-a]: field 'disabled': must be true or false"),
    ({"api_keys.0.expires_at": "next year"},
     "resources.yaml: api_keys[team-a]: field 'expires_at': must be an RFC 3339 timestamp"),
    ({"api_keys.0.expires_at": "2027-01-01"},
     "resources.yaml: api_keys[team-a]: field 'expires_at': must be an RFC 3339 timestamp"),
    ({"api_keys.0.expires_at": "2027-13-01T00:00:00Z"},
     "resources.yaml: api_keys[team-a]: field 'expires_at': must be an RFC 3339 timestamp"),
    ({"api_keys.0.expires_at": dt.date(2027, 1, 1)},
     "resources.yaml: api_keys[team-a]: field 'expires_at': must be an RFC 3339 timestamp, got a date"),
    ({"guardrails.0.kind": "regex"}, "resources.yaml: guardrails[no-secrets]: field 'kind': must be one of 'keyword'"),
    ({"guardrails.0.hook_point": "both"},
     "resources.yaml: guardrails[no-secrets]: field 'hook_point': must be one of 'input', 'output'"),
    ({"guardrails.0.enforcement_mode": "warn"},
     "resources.yaml: guardrails[no-secrets]: field 'enforcement_mode': must be one of 'block', 'monitor'"),
    ({"guardrails.0.patterns": []}, "resources.yaml: guardrails[no-secrets]: field 'patterns': must be a non-empty list"),
    ({"guardrails.0.patterns.0.kind": "glob"},
     "resources.yaml: guardrails[no-secrets]: field 'patterns[0].kind': must be one of 'literal', 'regex'"),
    ({"guardrails.0.patterns.1.value": "(unclosed"},
     "resources.yaml: guardrails[no-secrets]: field 'patterns[1].value': invalid regex"),
    ({"guardrails.0.patterns.0": "password"},
     "resources.yaml: guardrails[no-secrets]: field 'patterns[0]': must be a mapping, got a string"),
    ({"models.0.model_name": "${UPSTREAM_MODEL}"},
     "resources.yaml: models[tts-prod]: field 'model_name': environment variable 'UPSTREAM_MODEL' is not set"),
    ({"api_keys.0.allowed_models": ["${EXTRA}"]},
     "resources.yaml: api_keys[team-a]: field 'allowed_models[0]': environment variable 'EXTRA' is not set"),
    ({"models.0.model_name": "gpt-${oops"}, "resources.yaml: models[tts-prod]: field 'model_name': malformed ${...}"),
]


@pytest.mark.parametrize(("changes", "expected"), RESOURCE_PROBLEMS, ids=[e for _, e in RESOURCE_PROBLEMS])
def test_resource_problem_names_file_resource_and_field(tmp_path: Path, changes: dict[str, Any],
                                                        expected: str) -> None:
    found = problems(write(tmp_path, resources=patched(RESOURCES, changes)))
    assert any(p.startswith(expected) for p in found), found


# -- config.yaml ---------------------------------------------------------------------------------

CONFIG_PROBLEMS = [
    ({"proxys": {}}, "config.yaml: field 'proxys': unknown field"),
    ({"proxy": {"listen_addr": "x"}}, "config.yaml: proxy: field 'listen_addr': unknown field"),
    ({"proxy": ["127.0.0.1:3000"]}, "config.yaml: field 'proxy': must be a mapping, got a list"),
    ({"proxy": {"listen": "3000"}}, "config.yaml: proxy: field 'listen': must be host:port"),
    ({"proxy": {"listen": "localhost:http"}}, "config.yaml: proxy: field 'listen': must be host:port"),
    ({"proxy": {"listen": "::1:3000"}}, "config.yaml: proxy: field 'listen': must be host:port"),
    ({"proxy": {"listen": "127.0.0.1:70000"}}, "config.yaml: proxy: field 'listen': must be host:port"),
    ({"proxy": {"listen": 3000}}, "config.yaml: proxy: field 'listen': must be a string, got 3000"),
    ({"proxy": {"request_body_limit_bytes": -1}},
     "config.yaml: proxy: field 'request_body_limit_bytes': must be an integer >= 0, got -1"),
    ({"proxy": {"request_body_limit_bytes": False}},
     "config.yaml: proxy: field 'request_body_limit_bytes': must be an integer >= 0, got a boolean"),
    ({"proxy": {"json_body_limit_bytes": 0}}, "config.yaml: proxy: field 'json_body_limit_bytes': must be a positive"),
    ({"proxy": {"request_id_headers": "x-request-id"}},
     "config.yaml: proxy: field 'request_id_headers': must be a list of strings"),
    ({"proxy": {"request_id_headers": ["x request id"]}},
     "config.yaml: proxy: field 'request_id_headers': must be HTTP header names"),
    ({"proxy": {"cors": ["https://app.example.com"]}},
     "config.yaml: proxy: field 'cors': must be a mapping, got a list"),
    ({"proxy": {"cors": {"origins": ["*"]}}}, "config.yaml: proxy: field 'cors.origins': unknown field"),
    ({"proxy": {"cors": {"allowed_origins": "*"}}},
     "config.yaml: proxy: field 'cors.allowed_origins': must be a list of strings"),
    ({"proxy": {"cors": {"allowed_origins": ["https://app.example.com/"]}}},
     "config.yaml: proxy: field 'cors.allowed_origins': must be '*' or origins as browsers send them"),
    ({"proxy": {"cors": {"allowed_origins": ["*", "https://app.example.com"]}}},
     "config.yaml: proxy: field 'cors.allowed_origins': must be ['*'] alone"),
    ({"proxy": {"realtime_heartbeat_ms": -1}},
     "config.yaml: proxy: field 'realtime_heartbeat_ms': must be an integer >= 0, got -1"),
    ({"proxy": {"realtime_heartbeat_ms": 5}},
     "config.yaml: proxy: field 'realtime_heartbeat_ms': must be 0 (off) or at least 100"),
    ({"upstream": {"timeout_ms": "600s"}}, "config.yaml: upstream: field 'timeout_ms': must be a positive integer"),
    ({"upstream": {"max_connections": True}},
     "config.yaml: upstream: field 'max_connections': must be a positive integer, got a boolean"),
    ({"metrics": {"listen": "metrics"}}, "config.yaml: metrics: field 'listen': must be host:port"),
    ({"metrics": {"listen": "127.0.0.1:3000"}}, "config.yaml: metrics: field 'listen': must differ from proxy.listen"),
    ({"usage": {"sink": "syslog"}}, "config.yaml: usage: field 'sink': must be 'stdout', 'file:<path>'"),
    ({"usage": {"sink": "file:"}}, "config.yaml: usage: field 'sink': must be 'stdout', 'file:<path>'"),
    ({"ratelimit": {"backend": "memcached://x"}}, "config.yaml: ratelimit: field 'backend': must be 'memory'"),
    ({"access_log": {"probes": "yes"}},
     "config.yaml: access_log: field 'probes': must be true or false, got a string"),
    ({"access_log": True}, "config.yaml: field 'access_log': must be a mapping"),
    ({"resources_file": 5}, "config.yaml: field 'resources_file': must be a string, got 5"),
    ({"resources_file": "missing.yaml"}, "missing.yaml: cannot read "),
    ({"usage": {"sink": "${USAGE_SINK}"}},
     "config.yaml: usage: field 'sink': environment variable 'USAGE_SINK' is not set"),
]


@pytest.mark.parametrize(("settings", "expected"), CONFIG_PROBLEMS, ids=[e for _, e in CONFIG_PROBLEMS])
def test_config_problem_names_file_section_and_field(tmp_path: Path, settings: dict[str, Any],
                                                     expected: str) -> None:
    found = problems(write(tmp_path, settings=settings))
    assert any(p.startswith(expected) for p in found), found


@pytest.mark.parametrize(("listen", "expected"), [
    ("127.0.0.1:3000", Listen("127.0.0.1", 3000)),
    ("[::1]:3000", Listen("::1", 3000)),
    ("localhost:0", Listen("localhost", 0)),
    ("0.0.0.0:65535", Listen("0.0.0.0", 65535)),
])
def test_listen_forms(tmp_path: Path, listen: str, expected: Listen) -> None:
    path = write(tmp_path, settings={"proxy": {"listen": listen}, "metrics": {"listen": None}})
    settings = config.load(path, {}).settings
    assert settings.proxy.listen == expected and settings.metrics_listen is None


def test_settings_defaults_and_paths(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "config.yaml").write_text("# nothing set\n")
    s = config.load_settings(tmp_path / "etc" / "config.yaml", {})
    assert s.proxy.request_body_limit_bytes == 0 and s.proxy.json_body_limit_bytes == 1048576
    assert s.proxy.request_id_headers == ("x-aisix-request-id",) and s.proxy.cors is None
    assert s.upstream == config.UpstreamSettings(5000, 600000, 60000, 1000)
    assert s.resources_file == tmp_path / "etc" / "resources.yaml" and s.config_file.is_absolute()
    assert s.access_log_probes is False
    (tmp_path / "etc" / "config.yaml").write_text(
        "proxy: {request_id_headers: [X-Request-ID]}\nupstream: {timeout_ms: 1000}\nresources_file: ../r.yaml\n"
        "access_log: {probes: true}\n")
    s = config.load_settings(tmp_path / "etc" / "config.yaml", {})
    assert s.proxy.request_id_headers == ("x-request-id",) and s.upstream.timeout_ms == 1000
    assert s.access_log_probes is True
    assert s.upstream.max_connections == 1000 and s.resources_file == tmp_path / "r.yaml"
    (tmp_path / "etc" / "config.yaml").write_text(
        "proxy:\n  request_id_headers: [X-Request-ID]\n  cors:\n    allowed_origins: [HTTPS://App.Example]\n")
    cors = config.load_settings(tmp_path / "etc" / "config.yaml", {}).proxy.cors
    assert cors is not None and cors.origins == {"https://app.example"} and "x-request-id" in cors.request_headers
    for off in ("proxy: {cors: null}\n", "proxy: {cors: {allowed_origins: []}}\n"):
        (tmp_path / "etc" / "config.yaml").write_text(off)
        assert config.load_settings(tmp_path / "etc" / "config.yaml", {}).proxy.cors is None


@pytest.mark.parametrize(("text", "expected"), [
    ("proxy: [", "config.yaml: line 1, column 9: invalid YAML: expected the node content"),
    ("proxy: {listen: a:1, listen: b:2}", "config.yaml: line 1, column 22: invalid YAML: repeated key 'listen'"),
    ("- proxy", "config.yaml: the top level must be a mapping, got a list"),
])
def test_unreadable_config(tmp_path: Path, text: str, expected: str) -> None:
    (found,) = problems(write(tmp_path, settings=text))
    assert found.startswith(expected), found


def test_missing_files_are_problems(tmp_path: Path) -> None:
    assert problems(tmp_path / "config.yaml")[0].startswith(f"config.yaml: cannot read {tmp_path}")
    (tmp_path / "config.yaml").write_text("")
    assert problems(tmp_path / "config.yaml") == (
        f"resources.yaml: cannot read {tmp_path / 'resources.yaml'}: No such file or directory",)


def test_every_problem_of_both_files_is_collected(tmp_path: Path) -> None:
    broken = patched(RESOURCES, {"models.0.timeout": True, "models.1.provider_key": "nope",
                                 "api_keys.0.allowed_models": "tts-*", "guardrails.0.patterns.1.value": "("})
    found = problems(write(tmp_path, settings={"proxy": {"listen": "nowhere"}, "usage": {"sink": "x"}},
                           resources=broken))
    assert [p.split(":")[0] for p in found] == ["config.yaml"] * 2 + ["resources.yaml"] * 4, found


# -- ${VAR} substitution -------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "env", "expected"), [
    ("${M}", {"M": "whisper-1"}, "whisper-1"),
    ("pre-${M}-post", {"M": "x"}, "pre-x-post"),
    ("${M}${N}", {"M": "a", "N": "b"}, "ab"),
    ("${M:-whisper-1}", {}, "whisper-1"),
    ("${M:-whisper-1}", {"M": ""}, "whisper-1"),
    ("${M:-whisper-1}", {"M": "whisper-2"}, "whisper-2"),
    ("$${M}", {"M": "x"}, "${M}"),
    ("cost $5 and $M", {"M": "x"}, "cost $5 and $M"),
])
def test_substitution(tmp_path: Path, value: str, env: dict[str, str], expected: str) -> None:
    path = write(tmp_path, settings={"usage": {"sink": "${SINK:-stdout}"}},
                 resources=patched(RESOURCES, {"models.1.model_name": value}))
    loaded = config.load(path, env)
    assert loaded.resources.models["whisper-prod"].targets[0].model_name == expected
    assert loaded.resources.models["whisper-prod"].targets[0].model_name_bytes == expected.encode()
    assert loaded.settings.usage_sink.kind == "stdout"


def test_substitution_applies_to_values_not_to_yaml_text(tmp_path: Path) -> None:
    """A value that looks like YAML stays one string: substitution never re-parses."""
    path = write(tmp_path, resources=patched(RESOURCES, {"models.1.model_name": "${M}"}))
    model = config.load(path, {"M": "a: [1, 2]\nb: c"}).resources.models["whisper-prod"]
    assert model.targets[0].model_name == "a: [1, 2]\nb: c"


# -- secrets never reach an error ----------------------------------------------------------------

SECRETS = {"OPENAI_API_KEY": "sk-env-secret-0001", "TEAM_A_KEY": "sk-caller-secret-0002",
           "PART": "sk-part-secret-0003"}
LITERAL = "sk-literal-secret-0004"


def assert_no_secret(error: ConfigError) -> None:
    for text in (str(error), repr(error), *error.problems):
        for secret in (*SECRETS.values(), LITERAL):
            assert secret not in text


def test_secrets_never_appear_in_errors(tmp_path: Path) -> None:
    broken = patched(RESOURCES, {
        "provider_keys.0.api_key": "${OPENAI_API_KEY}", "provider_keys.0.api_base": "gopher://x",
        "provider_keys.0.colour": "blue",
        "provider_keys.1": {"display_name": "other", "provider": "openai", "api_base": "http://x",
                            "api_key": LITERAL + "\n"},
        "provider_keys.2": {"display_name": "third", "provider": "openai", "api_base": "http://x",
                            "api_key": "${PART}${UNSET_PART}"},
        "api_keys.0.key_hash": DELETE, "api_keys.0.key_env": "TEAM_A_KEY", "api_keys.0.expires_at": "soon",
        "api_keys.1": {"display_name": "team-b", "key_env": "TEAM_A_KEY"},
    })
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, resources=broken), SECRETS)
    assert len(info.value.problems) >= 5
    assert_no_secret(info.value)


@pytest.mark.parametrize("password", ["Pa55?w0rdXYZ", "Pa55#w0rdXYZ", "Pa/55@w0rdXYZ", "Pa55?x@w0rdXYZ"])
@pytest.mark.parametrize(("section", "field"), [("usage", "sink"), ("ratelimit", "backend")])
def test_a_redis_password_never_appears_in_an_error(tmp_path: Path, password: str, section: str,
                                                    field: str) -> None:
    # A '?' in it made the redaction look for the userinfo in the part before it: printed whole.
    found = problems(write(tmp_path, settings={section: {field: f"redis://:{password}@127.0.0.1:6379/0?x=1"}}))
    assert found and not any(password in p or "w0rdXYZ" in p for p in found), found


@pytest.mark.parametrize("query", ["password=Pa55w0rdXYZ", "stream=s&password=Pa55w0rdXYZ",
                                   "username=u&password=Pa55w0rdXYZ&maxlen=9"])
@pytest.mark.parametrize(("section", "field"), [("usage", "sink"), ("ratelimit", "backend")])
def test_a_redis_password_in_the_query_never_appears_in_an_error(tmp_path: Path, query: str, section: str,
                                                                 field: str) -> None:
    # redis-py's URLs take ?password=...; aisix refuses the option, and its message quoted the
    # URL with the password in it, into the journal of a serve that refused to start.
    found = problems(write(tmp_path, settings={section: {field: f"redis://127.0.0.1:6379/0?{query}"}}))
    assert found and not any("w0rdXYZ" in p for p in found), found


@pytest.mark.parametrize("query", ["password=Pa55@w0rdXYZ", "stream=s&password=Pa55@w0rdXYZ&maxlen=9",
                                   "password=Pa55&w0rdXYZ", "password=Pa55&w0rdXYZ=1&stream=s"])
@pytest.mark.parametrize(("section", "field"), [("usage", "sink"), ("ratelimit", "backend")])
def test_a_redis_password_with_an_at_or_amp_in_the_query_never_appears_in_an_error(tmp_path: Path, query: str,
                                                                             section: str, field: str) -> None:
    # The redaction took the query's '@' for the end of a userinfo: what followed it, the rest of
    # the password, was quoted as the host. An '&' made the rest of the password an option of its
    # own, whose name the redaction and the messages (unknown option, bad query field) quoted.
    found = problems(write(tmp_path, settings={section: {field: f"redis://127.0.0.1:6379/0?{query}"}}))
    assert found and not any("w0rdXYZ" in p for p in found), found


def test_secret_on_a_yaml_syntax_error_line_is_not_quoted(tmp_path: Path) -> None:
    text = f'provider_keys:\n  - display_name: x\n    api_key: "{LITERAL}\n    provider: [\n'
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, resources=text), {})
    assert "invalid YAML" in str(info.value)
    assert_no_secret(info.value)


def test_provider_secret_is_not_in_repr(tmp_path: Path) -> None:
    path = write(tmp_path, resources=patched(RESOURCES, {"provider_keys.0.api_key": "${OPENAI_API_KEY}"}))
    loaded = config.load(path, SECRETS)
    key = loaded.resources.provider_keys["openai-main"]
    assert key.auth_header == "Authorization: Bearer " + SECRETS["OPENAI_API_KEY"]
    assert SECRETS["OPENAI_API_KEY"] not in repr(loaded)


# -- what loading builds -------------------------------------------------------------------------

def test_what_loading_builds(tmp_path: Path) -> None:
    r = config.load(write(tmp_path), {}).resources
    key = r.provider_keys["openai-main"]
    assert key.api_base == "https://api.openai.com/v1" and key.auth_header == "Authorization: Bearer sk-provider-secret"
    tts = r.models["tts-prod"]
    assert tts.targets[0].urls == {"speech": "https://api.openai.com/v1/audio/speech",
                        "transcriptions": "https://api.openai.com/v1/audio/transcriptions",
                        "translations": "https://api.openai.com/v1/audio/translations",
                        "realtime": "wss://api.openai.com/v1/realtime?model=gpt-4o-mini-tts"}
    assert tts.routes == {"speech"} and tts.timeout_ms == 120000 and tts.rate_limit == config.RateLimit(rpm=600, concurrency=32)
    assert r.models["whisper-prod"].rate_limit is None and hash(tts) == hash(tts)
    assert r.models["whisper-prod"].routes == {"speech", "transcriptions", "translations", "realtime"}  # default all
    (team,) = r.api_keys
    assert team.expires_at == dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc)
    assert team.rate_limit == config.RateLimit(rpm=60, tpm=100000) and team.disabled is False
    (guardrail,) = r.guardrails
    assert [p.kind for p in guardrail.patterns] == ["literal", "regex"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        tts.alias = "other"  # type: ignore[misc]


@pytest.mark.parametrize(("globs", "allowed"), [
    (["tts-*"], ("tts-dev", "tts-prod")),
    (["*"], ("tts-dev", "tts-prod", "whisper-prod")),
    (["whisper-prod", "tts-d?v"], ("tts-dev", "whisper-prod")),
    (["TTS-*"], ()),
    (["gpt-*"], ()),
    ([], ()),
])
def test_allowed_is_computed_from_globs(tmp_path: Path, globs: list[str], allowed: tuple[str, ...]) -> None:
    doc = patched(RESOURCES, {"models.2": {**RESOURCES["models"][0], "display_name": "tts-dev"},
                              "api_keys.0.allowed_models": globs, "guardrails.0.models": globs})
    r = config.load(write(tmp_path, resources=doc), {}).resources
    assert r.api_keys[0].allowed_sorted == allowed and r.api_keys[0].allowed == frozenset(allowed)
    assert r.api_keys[0].allowed_models == tuple(globs) and r.guardrails[0].applies_to == frozenset(allowed)


def test_allowed_models_defaults_to_nothing(tmp_path: Path) -> None:
    doc = patched(RESOURCES, {"api_keys.0.allowed_models": DELETE, "guardrails.0.models": DELETE})
    r = config.load(write(tmp_path, resources=doc), {}).resources
    assert r.api_keys[0].allowed == frozenset() and r.guardrails[0].models == ("*",)


@pytest.mark.parametrize(("key", "changes"), [
    ("sk-team-a", {}),
    ("sk-team-a", {"api_keys.0.key_hash": sha("sk-team-a").upper()}),
    ("sk-from-env", {"api_keys.0.key_hash": DELETE, "api_keys.0.key_env": "TEAM_A_KEY"}),
])
def test_keys_by_hash(tmp_path: Path, key: str, changes: dict[str, Any]) -> None:
    path = write(tmp_path, resources=patched(RESOURCES, changes))
    r = config.load(path, {"TEAM_A_KEY": "sk-from-env"}).resources
    assert r.keys_by_hash[config.hash_key(key)].name == "team-a"
    assert re.fullmatch("[0-9a-f]{64}", r.api_keys[0].key_hash)


@pytest.mark.parametrize(("written", "expected"), [
    ('"2027-01-01T00:00:00Z"', dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc)),
    ('"2027-01-01t01:30:00.5+01:30"', dt.datetime(2027, 1, 1, 0, 0, 0, 500000, tzinfo=dt.timezone.utc)),
    ("2027-01-01T00:00:00Z", dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc)),  # YAML's own timestamp
    ("2027-01-01 00:00:00", dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc)),  # naive: taken as UTC
])
def test_expires_at_forms(tmp_path: Path, written: str, expected: dt.datetime) -> None:
    text = yaml.safe_dump(patched(RESOURCES, {"api_keys.0.expires_at": "EXPIRES"}), sort_keys=False)
    path = write(tmp_path, resources=text.replace("EXPIRES", written))
    expires_at = config.load(path, {}).resources.api_keys[0].expires_at
    assert expires_at == expected and expires_at.tzinfo == dt.timezone.utc


def test_empty_resources_file_is_valid(tmp_path: Path) -> None:
    r = config.load(write(tmp_path, resources=""), {}).resources
    assert (dict(r.models), r.api_keys, r.guardrails) == ({}, (), ())


def test_targets_retry_cooldown_and_azure(tmp_path: Path) -> None:
    doc = patched(RESOURCES, {
        "provider_keys.1": {"display_name": "azure-east", "provider": "azure", "api_base": "https://east.example.com/",
                            "api_key": "azure-secret", "api_version": "2024-10-21", "rate_limit": {"rpm": 300}},
        "provider_keys.2": {"display_name": "azure-v1", "provider": "azure", "api_base": "https://west.example.com",
                            "api_key": "azure-secret-2", "api_version": "v1"},
        "models.1": {"display_name": "whisper-prod", "targets": [
            {"provider_key": "openai-main", "model_name": "whisper-1", "weight": 3},
            {"provider_key": "azure-east", "model_name": "whisper east"},
            {"provider_key": "azure-v1", "model_name": "whisper-west", "priority": 1}],
            "retry": {"max_attempts": 2}, "cooldown": {"cooldown_s": 5}},
    })
    r = config.load(write(tmp_path, resources=doc), {}).resources
    whisper = r.models["whisper-prod"]
    assert [(t.provider_key.name, t.model_name, t.weight, t.priority) for t in whisper.targets] == [
        ("openai-main", "whisper-1", 3, 0), ("azure-east", "whisper east", 1, 0), ("azure-v1", "whisper-west", 1, 1)]
    assert whisper.retry == config.Retry(2, 256 * 1024 * 1024)
    assert whisper.cooldown == config.Cooldown(failures=3, window_s=60, cooldown_s=5)
    east, west = whisper.targets[1], whisper.targets[2]
    assert east.urls["transcriptions"] == ("https://east.example.com/openai/deployments/whisper%20east/audio/"
                                           "transcriptions?api-version=2024-10-21")
    assert west.urls["speech"] == "https://west.example.com/openai/v1/audio/speech"
    assert east.urls["realtime"] == ("wss://east.example.com/openai/realtime?api-version=2024-10-21"
                                     "&deployment=whisper%20east")
    assert west.urls["realtime"] == "wss://west.example.com/openai/v1/realtime?model=whisper-west"
    assert east.provider_key.auth_header == "api-key: azure-secret"
    assert east.provider_key.rate_limit == config.RateLimit(rpm=300)
    assert "azure-secret" not in repr(r)
    # the single form is one target, and max_attempts defaults to the number of targets
    tts = r.models["tts-prod"]
    assert len(tts.targets) == 1 and tts.retry.max_attempts == 1 and tts.targets[0].id == "openai-main/gpt-4o-mini-tts"


def test_usage_spill_dir(tmp_path: Path) -> None:
    path = write(tmp_path)
    assert config.load_settings(path, {"STATE_DIRECTORY": "/var/lib/aisix"}).usage_spill_dir == Path(
        "/var/lib/aisix/usage-spill")  # systemd's StateDirectory=
    path = write(tmp_path, {"usage": {"spill_dir": "spill"}})
    assert config.load_settings(path, {}).usage_spill_dir == tmp_path / "spill"
    path = write(tmp_path, {"usage": {"spill_dir": None}})
    assert config.load_settings(path, {}).usage_spill_dir is None  # off: what the sink cannot take is dropped


def test_a_relative_usage_file_is_beside_config_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As resources_file and spill_dir are. It was the working directory's: "/" under systemd
    # (a read-only file system there), and aisix validate, run from wherever the operator stood,
    # checked another directory than the serve it vouched for.
    (tmp_path / "etc").mkdir()
    (tmp_path / "elsewhere").mkdir()
    path = write(tmp_path / "etc", {"usage": {"sink": "file:logs/usage.jsonl"}})
    monkeypatch.chdir(tmp_path / "elsewhere")
    sink = config.load_settings(path, {}).usage_sink
    assert (sink.kind, sink.target) == ("file", str(tmp_path / "etc" / "logs" / "usage.jsonl"))
    path = write(tmp_path / "etc", {"usage": {"sink": "file:/var/log/aisix/usage.jsonl"}})
    assert config.load_settings(path, {}).usage_sink.target == "/var/log/aisix/usage.jsonl"
