"""Keyword guardrails: which rule a piece of text trips, and whether that blocks or is only noted.

[core] Patterns were compiled when the config loaded; this only runs them. It is given speech
``input``, transcription ``prompt`` parts and transcripts, never audio bytes. A verdict names the
guardrail, never the text that matched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from . import errors
from .config import Guardrail, Resources

INPUT = "input"
OUTPUT = "output"
BLOCKED = "blocked"
MONITORED = "monitored"


@dataclass(frozen=True, slots=True)
class Verdict:
    guardrail: str
    action: str  # BLOCKED or MONITORED

    def as_event(self) -> dict[str, str]:
        return {"name": self.guardrail, "action": self.action}


def rules_for(resources: Resources, alias: str, hook_point: str) -> tuple[Guardrail, ...]:
    """The guardrails on this alias at this hook point (indexed when the config loaded)."""
    return resources.rules.get((alias, hook_point), ())


def blocks(rules: Sequence[Guardrail]) -> bool:
    return any(g.enforcement_mode == "block" for g in rules)


def check(rules: Sequence[Guardrail], text: str) -> Verdict | None:
    """The first blocking rule that matches, else the first monitoring one, else None."""
    noted = None
    for rule in rules:
        if any(p.regex.search(text) for p in rule.patterns):
            if rule.enforcement_mode == "block":
                return Verdict(rule.name, BLOCKED)
            noted = noted or Verdict(rule.name, MONITORED)
    return noted


def enforce(rules: Sequence[Guardrail], text: str) -> Verdict | None:
    """Run the rules on text: a monitoring match to record, or None; a blocking match raises
    the 422 (``GuardrailBlocked`` names the rule, never the text)."""
    if not rules:
        return None
    verdict = check(rules, text)
    if verdict is not None and verdict.action == BLOCKED:
        raise errors.GuardrailBlocked(verdict.guardrail)
    return verdict
