"""Keyword guardrails as plain functions."""

from __future__ import annotations

import re

import pytest

from aisix.config import Guardrail, Pattern
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


def test_rules_for_picks_hook_point_and_alias() -> None:
    out = rule("out", "block", ("literal", "x"), hook="output")
    other = rule("other", "block", ("literal", "x"), aliases=frozenset({"whisper-prod"}))
    assert rules_for((SECRETS, out, other, WATCH), "tts-prod", "input") == (SECRETS, WATCH)
    assert rules_for((SECRETS, out, other), "tts-prod", "output") == (out,)
    assert blocks((WATCH,)) is False and blocks((WATCH, SECRETS)) is True


def test_verdict_never_carries_the_text() -> None:
    verdict = check((SECRETS,), "password hunter2")
    assert verdict is not None and "hunter2" not in repr(verdict) and "password" not in repr(verdict)
