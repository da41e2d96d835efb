"""The exchange record: its timestamp format and its usage event."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from aisix.answer import Usage
from aisix.exchange import Exchange, rfc3339
from aisix.guardrails import Verdict


def test_rfc3339_matches_datetime() -> None:
    rng = random.Random(7)
    for ts in [0.0, 1795000000.001, 1795000000.9996, 1795000000.0005, *(rng.uniform(0, 4e9) for _ in range(2000))]:
        assert rfc3339(ts) == datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_event_has_unknowns_absent_and_nothing_guessed() -> None:
    ex = Exchange("speech", "rid-1", ts=0.0)
    event = ex.event()
    assert event["api_key"] is None and event["error_code"] is None and event["stream"] is False
    assert not {"model", "upstream_model", "provider_key", "upstream_ttfb_ms", "input_tokens",
                "audio_seconds", "guardrail"} & event.keys()
    ex.usage = Usage(None, 3, None, 2.5)
    ex.verdict = Verdict("g", "monitored")
    event = ex.event()
    assert (event["output_tokens"], event["audio_seconds"], event["guardrail"]) == (3, 2.5, {"name": "g", "action": "monitored"})
    assert "input_tokens" not in event and "total_tokens" not in event


def test_screen_records_a_match_and_raises_only_for_a_block() -> None:
    import re

    import pytest

    from aisix.config import Guardrail, Pattern
    from aisix.errors import GatewayError

    def rule(name: str, mode: str, word: str) -> Guardrail:
        return Guardrail(name, "keyword", ("*",), frozenset({"a"}), "input", mode,
                         (Pattern("literal", word, re.compile(re.escape(word), re.I)),))

    ex = Exchange("speech", "rid")
    ex.screen((), "anything")
    ex.screen((rule("watch", "monitor", "refund"),), "no match")
    assert ex.verdict is None
    ex.screen((rule("watch", "monitor", "refund"),), "a REFUND please")
    assert ex.verdict == Verdict("watch", "monitored")
    with pytest.raises(GatewayError) as info:
        ex.screen((rule("stop", "block", "secret"),), "the secret")
    assert (info.value.status, info.value.code) == (422, "guardrail_blocked")
    assert ex.verdict == Verdict("stop", "blocked")
