"""One audio request as the gateway saw it: the record every stage fills and the usage event reads.

Created when a request reaches an audio handler, finished exactly once in the handler's
``finally``. Holds names and counts only: never a key, a prompt or audio bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import guardrails
from .answer import Usage
from .config import Guardrail
from .guardrails import Verdict


@dataclass(slots=True)
class Exchange:
    route: str
    request_id: str
    ts: float = field(default_factory=time.time)            # wall clock, for the event's ts
    started: float = field(default_factory=time.monotonic)
    api_key: str | None = None
    model: str | None = None
    upstream_model: str | None = None
    provider_key: str | None = None
    status: int = 0
    error_code: str | None = None
    upstream_sent: float | None = None      # monotonic, when the last request byte went upstream
    upstream_ttfb_ms: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    stream: bool = False
    usage: Usage | None = None              # only what the upstream reported
    verdict: Verdict | None = None          # a guardrail that matched
    response: web.StreamResponse | None = None  # set once the caller has the status line

    def fail(self, status: int, code: str) -> None:
        """Record a failure; once an answer has started, the caller keeps the status it got."""
        if self.response is None:
            self.status = status
        self.error_code = code

    def screen(self, rules: tuple[Guardrail, ...], text: str) -> None:
        """Run the guardrails on text: a match is recorded; a blocking one raises the 422."""
        if not rules:
            return
        verdict = guardrails.check(rules, text)
        if verdict is not None:
            self.verdict = verdict
            if verdict.action == guardrails.BLOCKED:
                raise guardrails.blocked(verdict)

    def gone(self) -> None:
        """The caller went away before the answer was complete."""
        self.status = 499
        self.error_code = "client_closed"

    @property
    def latency_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    def event(self) -> dict[str, Any]:
        """The usage event (SPEC 6): fields that are unknown are absent, never guessed."""
        event: dict[str, Any] = {
            "ts": rfc3339(self.ts),
            "request_id": self.request_id,
            "route": self.route,
            "api_key": self.api_key,
            "status": self.status,
            "error_code": self.error_code,
            "latency_ms": self.latency_ms,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "stream": self.stream,
        }
        for name in ("model", "upstream_model", "provider_key", "upstream_ttfb_ms"):
            value = getattr(self, name)
            if value is not None:
                event[name] = value
        if self.usage is not None:
            u = self.usage
            for name, value in (("input_tokens", u.input_tokens), ("output_tokens", u.output_tokens),
                                ("total_tokens", u.total_tokens), ("audio_seconds", u.audio_seconds)):
                if value is not None:
                    event[name] = value
        if self.verdict is not None:
            event["guardrail"] = self.verdict.as_event()
        return event


_second: list = [None, ""]  # the last whole second formatted: most events share it


def rfc3339(ts: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. 2026-11-24T08:14:26.927Z."""
    micro = round(ts * 1_000_000)  # as datetime rounds a float timestamp
    second, ms = micro // 1_000_000, micro % 1_000_000 // 1000
    if _second[0] != second:
        _second[0], _second[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{ms:03d}Z"
