"""CORS, so a web page on another origin may call the gateway with fetch(): which origins
(``proxy.cors.allowed_origins``), the answer to a browser's preflight, and the grant every
answer carries. Strings in, header pairs out.

[core] No aiohttp, no I/O: responses.py puts the headers on, app.py routes the preflights. Off
(no ``Cors`` at all, no per-request work) unless origins are configured.

Never granted: credentials (``Access-Control-Allow-Credentials``). The caller's key travels in
``Authorization``, which a fetch sends without a credentials mode; cookies mean nothing here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

ANY = "*"
# What a page may read besides the CORS-safelisted response headers (Content-Type,
# Content-Length, ...): the ids to quote to an operator and what a 429 says about its window.
# Named one by one: the "*" wildcard would do for our fetches, but the Fetch standard ignores it
# whenever a page sends credentials, and a list says what the contract is.
EXPOSED = ", ".join((
    "x-aisix-request-id", "x-request-id", "x-upstream-request-id", "Retry-After", "retry-after-ms",
    "x-should-retry", "Content-Disposition",
    *(f"x-ratelimit-{what}-{unit}" for unit in ("requests", "tokens") for what in ("limit", "remaining", "reset")),
))
# Request headers a preflight may have granted: what the official SDKs send (OpenAI's JS SDK:
# Authorization, Content-Type, Accept, OpenAI-Organization, OpenAI-Project, OpenAI-Beta, and the
# X-Stainless-* telemetry), plus the request-id headers (proxy.request_id_headers). Prefixes keep
# a new SDK header working; anything else is left out of the answer, so the browser refuses that
# fetch before it is sent. The gateway forwards none of them upstream (docs/api.md, "Headers").
_HEADERS = ("authorization", "content-type", "accept")
_PREFIXES = ("openai-", "x-stainless-")
# How long a browser may reuse a preflight answer, in seconds: Chromium's own cap (two hours).
# The config is read once at start, so a cached grant cannot outlive a change by more than that,
# and the answers themselves stop carrying the grant at once.
MAX_AGE = "7200"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_HOST = re.compile(r"[a-z0-9.-]+|[0-9a-f:.]*:[0-9a-f:.]*")  # a name (punycode, as browsers send it) or IPv6


@dataclass(frozen=True, slots=True)
class Cors:
    origins: frozenset[str]  # exact, as browsers send Origin; empty when any_origin
    any_origin: bool
    request_headers: frozenset[str] = field(default=frozenset(_HEADERS))  # lowercase, exact

    def allows(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    def grant(self, origin: str | None) -> tuple[tuple[str, str], ...]:
        """The headers of any answer to a request from origin (None: no Origin header)."""
        if self.any_origin:  # the same for everyone: no Vary, caches may share the answer
            return _ANY_GRANT
        if origin is not None and origin in self.origins:
            return (("Access-Control-Allow-Origin", origin), ("Access-Control-Expose-Headers", EXPOSED),
                    ("Vary", "Origin"))
        return _VARY  # the answer to an allowed origin differs: a cache must not hand this one out

    def preflight(self, methods: str, requested: str | None) -> dict[str, str]:
        """A granted preflight's own headers (grant() adds the origin's): the route's methods and,
        of the headers the browser asks for, those allowed."""
        headers = {"Access-Control-Allow-Methods": methods, "Access-Control-Max-Age": MAX_AGE}
        granted = [name for name in (n.strip(" \t").lower() for n in (requested or "").split(","))
                   if _TOKEN.fullmatch(name) and (name in self.request_headers or name.startswith(_PREFIXES))]
        if granted:
            headers["Access-Control-Allow-Headers"] = ", ".join(granted)
        return headers


_ANY_GRANT = (("Access-Control-Allow-Origin", ANY), ("Access-Control-Expose-Headers", EXPOSED))
_VARY = (("Vary", "Origin"),)

ORIGIN_FORM = ("must be '*' or origins as browsers send them: http(s)://host[:port], no path, no default port "
               "(https://app.example.com)")


def parse(origins: tuple[str, ...], request_id_headers: tuple[str, ...]) -> Cors | None:
    """``proxy.cors.allowed_origins`` (lowercased: browsers send scheme and host so); None when
    empty (CORS off). Raises ValueError with the "must be ..." of the first problem."""
    if not origins:
        return None
    if ANY in origins:
        if len(origins) > 1:
            raise ValueError("must be ['*'] alone, or a list of origins without '*'")
        return Cors(frozenset(), True, frozenset((*_HEADERS, *request_id_headers)))
    canonical = []
    for text in origins:
        origin = text.lower()
        if origin != _serialised(origin):
            raise ValueError(ORIGIN_FORM)
        canonical.append(origin)
    return Cors(frozenset(canonical), False, frozenset((*_HEADERS, *request_id_headers)))


def _serialised(text: str) -> str | None:
    """text as a browser serialises an origin (the default port left out), or None if it is none."""
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError:
        return None
    if url.scheme not in ("http", "https") or not url.hostname or not _HOST.fullmatch(url.hostname) \
            or url.username is not None:
        return None
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    default = 443 if url.scheme == "https" else 80
    return f"{url.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")
