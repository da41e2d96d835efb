"""One audio request as the gateway saw it: the plain record every stage fills and the usage event
is made from (usage.event).

Created when a request reaches the pipeline, finished exactly once in its ``finally``. Holds names
and counts only: never a key, a prompt or audio bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .guardrails import Verdict
from .transcript import Usage

_random = bytearray()  # OS randomness not yet used: ids are cut from it, each 16 bytes once


def new_id() -> str:
    """A request's or a usage event's id: 32 hex digits from the OS's random source, the shape a
    uuid4's hex has (uuid4 builds a UUID object around the same 16 bytes, five times the cost).
    The bytes are fetched 4 KiB at a time, one getrandom() per 256 ids instead of one each; no
    byte serves two ids."""
    if not _random:
        _random.extend(os.urandom(4096))
    rid = _random[-16:].hex()
    del _random[-16:]
    return rid


@dataclass(slots=True)
class Exchange:
    route: str
    request_id: str
    ts: float                               # wall clock at arrival, for the event's ts
    started: float                          # monotonic at arrival, for its latency
    api_key: str | None = None
    model: str | None = None
    upstream_model: str | None = None
    provider_key: str | None = None
    status: int = 0
    error_code: str | None = None
    upstream_sent: float | None = None      # monotonic, when the last request byte went upstream
    upstream_ttfb_ms: int | None = None
    latency_ms: int = 0                     # set when the exchange ends
    bytes_in: int = 0
    bytes_out: int = 0
    stream: bool = False
    usage: Usage | None = None              # only what the upstream reported
    input_characters: int | None = None     # speech: characters of `input`
    audio_seconds_in: float | None = None   # an upload's duration, measured from its bytes
    audio_seconds_out: float | None = None  # a speech answer's duration, measured from its bytes
    cost_usd: float | None = None
    billable: bool = False                  # an upstream answered 2xx: the work was done
    verdict: Verdict | None = None          # a guardrail that matched
    response: web.StreamResponse | None = None  # set once the caller has the status line
    attempts: list[dict[str, Any]] | None = None  # one per upstream attempt (failover.py), in order
    close_code: int | None = None           # realtime: the close code the caller got
