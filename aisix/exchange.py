"""One audio request as the gateway saw it: the record every stage fills and the usage event reads.

Created when a request reaches an audio handler, finished exactly once in the handler's
``finally``. Holds names and counts only: never a key, a prompt or audio bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web


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
    response: web.StreamResponse | None = None  # set once the caller has the status line

    def fail(self, status: int, code: str) -> None:
        """Record a failure; once an answer has started, the caller keeps the status it got."""
        if self.response is None:
            self.status = status
        self.error_code = code

    def gone(self) -> None:
        """The caller went away before the answer was complete."""
        self.status = 499
        self.error_code = "client_closed"

    @property
    def latency_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)
