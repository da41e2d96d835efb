"""Where usage events and rate-limit counts go: ``usage.sink`` and ``ratelimit.backend`` parsed
once into typed values the factories take (usage.UsageSink.create, limits.Limiter.create).

[core] No I/O. A Redis password never reaches a message: every error and ``str()`` is redacted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import SplitResult, parse_qs, unquote_plus, urlsplit, urlunsplit


@dataclass(frozen=True, slots=True)
class SinkSpec:
    """Where usage events go (``usage.sink``), parsed once."""

    kind: str            # "stdout" | "file" | "redis"
    target: str = ""     # the file's path, or the Redis URL without its query
    stream: str = "aisix:usage"
    maxlen: int = 1000000
    name: str = "stdout"  # for messages: the spec with any password masked

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """Where rate-limit counts live (``ratelimit.backend``), parsed once."""

    kind: str            # "memory" | "redis"
    url: str = field(default="", repr=False)  # may hold a password

    def __str__(self) -> str:
        return "memory" if self.kind == "memory" else redact(self.url)


def parse_sink(text: str) -> SinkSpec:
    """``stdout``, ``file:<path>`` or ``redis[s]://host:port/db?stream=<name>&maxlen=<n>``."""
    if text == "stdout":
        return SinkSpec("stdout")
    if text.startswith("file:"):
        if len(text) == 5:
            raise ValueError("must be 'stdout', 'file:<path>' or 'redis://host:port/db?stream=<name>' (no path given)")
        return SinkSpec("file", text[5:], name=text)
    if text.startswith(("redis://", "rediss://")):
        name = redact(text)
        try:
            url = _split_redis(text)
            query = _sink_options(url.query)
            _redis_url(url)
            maxlen = int(query.get("maxlen", ["1000000"])[-1])
            if maxlen < 1:
                raise ValueError("maxlen must be at least 1")
        except ValueError as exc:
            raise ValueError(f"{name!r}: {exc}") from None
        return SinkSpec("redis", urlunsplit((url.scheme, url.netloc, url.path, "", "")),
                        query.get("stream", ["aisix:usage"])[-1], maxlen, name)
    raise ValueError("must be 'stdout', 'file:<path>' or 'redis://host:port/db?stream=<name>'")


def parse_backend(text: str) -> BackendSpec:
    """``memory`` or ``redis[s]://host:port/db``."""
    if text == "memory":
        return BackendSpec("memory")
    if text.startswith(("redis://", "rediss://")):
        try:
            url = _split_redis(text)
            if url.query:
                raise ValueError("takes no options")
            _redis_url(url)
        except ValueError as exc:
            raise ValueError(f"{redact(text)!r}: {exc}") from None
        return BackendSpec("redis", text)
    raise ValueError("must be 'memory' or 'redis://host:port/db'")


def _sink_options(query: str) -> dict[str, list[str]]:
    """A Redis sink's options. The first option that is not one of them is named, and nothing
    after it: a password given as ``?password=`` with an unescaped '&' makes what follows it look
    like options of their own (parse_qs's own message quotes a field without '=')."""
    for part in query.split("&") if query else ():
        name, equals, _ = part.partition("=")
        if not equals:
            raise ValueError("an option without '=' (expected stream=<name>, maxlen=<n>)")
        if unquote_plus(name) not in _SHOWN_OPTIONS:
            raise ValueError(f"unknown option(s) {unquote_plus(name)}; expected stream, maxlen")
    return parse_qs(query, strict_parsing=bool(query))


def _split_redis(text: str) -> SplitResult:
    """The URL's parts; a password whose '/', '?', '#' or '@' is not percent-encoded is refused
    before any part is named in a message (the parser would have cut it into the path, query or
    fragment, and a message about those would quote it)."""
    url = urlsplit(text)
    if "@" in url.path or "@" in url.query or "@" in url.fragment:
        raise ValueError("a password's '/', '?', '#' and '@' must be percent-encoded (%2F, %3F, %23, %40)")
    return url


def _redis_url(url: SplitResult) -> None:
    if not url.hostname:
        raise ValueError("no host")
    _ = url.port  # raises on a port that is not a number
    db = url.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"database {db!r} is not a number")


_SHOWN_OPTIONS = ("stream", "maxlen")  # the sink's own; any other option's value may be a secret


def redact(spec: str) -> str:
    """The spec without userinfo: a Redis password must not reach a message or a log line.
    Everything up to the last '@' goes: a password may hold an unescaped '/', '?', '#' or '@'.
    Query options other than the sink's own go too, with all that follows them: redis-py's URLs
    take ``?password=`` (whose value may hold an unescaped '&'), which aisix refuses in a message
    that quotes the URL. When a '?' comes before that '@', the '@' may be inside a query option's
    value (``?password=p@ss``): what follows it could be the rest of the password, not a host,
    and all of it goes."""
    scheme, sep, rest = spec.partition("://")
    if not sep:
        return spec
    if "@" in rest:
        hidden, _, rest = rest.rpartition("@")
        if "?" in hidden:
            return f"{scheme}://***"
        rest = "***@" + rest
    base, question, query = rest.partition("?")
    if question:  # the sink's own options as given, up to the first other one: from there, "***"
        shown = []
        for part in query.split("&"):
            if part.partition("=")[0] not in _SHOWN_OPTIONS:
                shown.append("***")  # its value may hold an '&', and the rest be more of it
                break
            shown.append(part)
        rest = f"{base}?{'&'.join(shown)}"
    return f"{scheme}://{rest}"
