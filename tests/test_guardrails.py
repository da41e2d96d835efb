"""Keyword guardrails as plain functions."""

from __future__ import annotations

import re

import pytest
import yaml

from aisix.config import Guardrail, Pattern, load_resources
from aisix.guardrails import BLOCKED, MONITORED, Verdict, blocks, check, rules_for


def rule(name: str, mode: str, *patterns: tuple[str, str], hook: str = "input",
         aliases: frozenset[str] = frozenset({"tts-prod"})) -> Guardrail:
    compiled = tuple(Pattern(k, v, re.compile(re.escape(v), re.I) if k == "literal" else re.compile(v))
                     for k, v in patterns)
    return Guardrail(name, "keyword", ("*",), aliases, hook, mode, compiled)


SECRETS = rule("no-secrets", "block", ("literal", "PassWord"), ("regex", r"\b\d{16}\b"))
WATCH = rule("watch", "monitor", ("literal", "refund"))


@pytest.mark.parametrize("text, expected", [
    ("my password is x", Verdict("no-secrets", BLOCKED)),
    ("MY PASSWORD", Verdict("no-secrets", BLOCKED)),
    ("card 1234567812345678 ok", Verdict("no-secrets", BLOCKED)),
    ("card 12345678123456789", None),
    ("I want a refund", Verdict("watch", MONITORED)),
    ("refund my password", Verdict("no-secrets", BLOCKED)),  # block beats monitor, whatever the order
    ("hello", None),
    ("", None),
])
def test_check(text: str, expected: Verdict | None) -> None:
    assert check((WATCH, SECRETS), text) == expected


def test_rules_are_indexed_by_alias_and_hook_point(tmp_path) -> None:
    def g(name: str, hook: str, models: list[str]) -> dict:
        return {"name": name, "kind": "keyword", "hook_point": hook, "enforcement_mode": "block",
                "models": models, "patterns": [{"kind": "literal", "value": "x"}]}

    path = tmp_path / "resources.yaml"
    path.write_text(yaml.safe_dump({
        "provider_keys": [{"display_name": "p", "provider": "openai", "api_base": "http://127.0.0.1:1/v1",
                           "api_key": "k"}],
        "models": [{"display_name": a, "provider_key": "p", "model_name": "m"} for a in ("tts-prod", "whisper-prod")],
        "guardrails": [g("all-in", "input", ["*"]), g("tts-out", "output", ["tts-*"]), g("w-in", "input", ["whisper-*"])],
    }))
    resources = load_resources(path, {})
    names = lambda alias, hook: [r.name for r in rules_for(resources, alias, hook)]  # noqa: E731
    assert names("tts-prod", "input") == ["all-in"] and names("tts-prod", "output") == ["tts-out"]
    assert names("whisper-prod", "input") == ["all-in", "w-in"] and names("whisper-prod", "output") == []
    assert names("made-up", "input") == []
    assert resources.scans_prompts is True
    assert blocks((WATCH,)) is False and blocks((WATCH, SECRETS)) is True


def test_verdict_never_carries_the_text() -> None:
    verdict = check((SECRETS,), "password hunter2")
    assert verdict is not None and "hunter2" not in repr(verdict) and "password" not in repr(verdict)
