"""The usage event of an exchange record, its timestamp format, and guardrail enforcement."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime

import pytest

from aisix.config import Guardrail, Pattern
from aisix.errors import GuardrailBlocked
from aisix.exchange import Exchange
from aisix.guardrails import Verdict, enforce
from aisix.transcript import Usage
from aisix.usage import event, rfc3339


def test_rfc3339_matches_datetime() -> None:
    rng = random.Random(7)
    for ts in [0.0, 1795000000.001, 1795000000.9996, 1795000000.0005, *(rng.uniform(0, 4e9) for _ in range(2000))]:
        assert rfc3339(ts) == datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_event_has_unknowns_absent_and_nothing_guessed() -> None:
    ex = Exchange("speech", "rid-1", 0.0, 0.0)
    e = event(ex)
    assert e["api_key"] is None and e["error_code"] is None and e["stream"] is False
    assert not {"model", "upstream_model", "provider_key", "upstream_ttfb_ms", "input_tokens",
                "audio_seconds", "guardrail"} & e.keys()
    ex.usage = Usage(None, 3, None, 2.5)
    ex.verdict = Verdict("g", "monitored")
    e = event(ex)
    assert (e["output_tokens"], e["audio_seconds"], e["guardrail"]) == (3, 2.5, {"name": "g", "action": "monitored"})
    assert "input_tokens" not in e and "total_tokens" not in e


def test_every_event_has_an_id_of_its_own() -> None:
    # Two requests can agree in every field, the request id included (a caller may send its own,
    # the same each time, within one millisecond): a consumer that counts each event once by its
    # line (aisix usage, the Redis sink's markers) would count them as one.
    ex = Exchange("speech", "caller-id", 0.0, 0.0)
    first, second = event(ex), event(ex)
    assert re.fullmatch("[0-9a-f]{32}", first["event_id"]) and first["event_id"] != second["event_id"]
    assert {k: v for k, v in first.items() if k != "event_id"} == {k: v for k, v in second.items() if k != "event_id"}


def rule(name: str, mode: str, word: str) -> Guardrail:
    return Guardrail(name, "keyword", ("*",), frozenset({"a"}), "input", mode,
                     (Pattern("literal", word, re.compile(re.escape(word), re.I)),))


def test_enforce_returns_a_monitoring_match_and_raises_only_for_a_block() -> None:
    assert enforce((), "anything") is None
    assert enforce((rule("watch", "monitor", "refund"),), "no match") is None
    assert enforce((rule("watch", "monitor", "refund"),), "a REFUND please") == Verdict("watch", "monitored")
    with pytest.raises(GuardrailBlocked) as info:
        enforce((rule("watch", "monitor", "the"), rule("stop", "block", "secret")), "the secret")
    assert (info.value.status, info.value.code, info.value.guardrail) == (422, "guardrail_blocked", "stop")
    assert "secret" not in info.value.message.replace("'stop'", "")
