"""Config files -> frozen, indexed dataclasses, strictly; reads only the files and env it is given.

Every problem is collected before one ConfigError is raised; each names file, resource and field,
and none echoes a string value (it may be a secret). This module holds the dataclasses both files
become, reads config.yaml (process settings) and says how loading goes; resources.yaml (what
callers can reach: provider keys, models and their targets, api keys, guardrails) is read by
config_resources.py; how a field is read (types, ``${VAR}``, repeated keys) is config_yaml.py.

[core] No sockets, no clock, no asyncio: when to (re)load and what to do with a ConfigError is
the caller's business.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from .config_yaml import Reader, read_mapping
from .cors import Cors
from .cors import parse as parse_cors
from .specs import BackendSpec, SinkSpec, parse_backend, parse_sink

T = TypeVar("T")


class ConfigError(Exception):
    """One or more problems in the config files; one line per problem."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Requests per second/minute/hour/day, tokens per minute/day, requests in flight, USD per UTC
    day/month, audio seconds per hour/day; None = no limit."""

    rps: int | None = None
    rpm: int | None = None
    rph: int | None = None
    rpd: int | None = None
    tpm: int | None = None
    tpd: int | None = None
    concurrency: int | None = None
    cost_usd_per_day: float | None = None
    cost_usd_per_month: float | None = None
    audio_seconds_per_hour: int | None = None
    audio_seconds_per_day: int | None = None


@dataclass(frozen=True, slots=True)
class Pricing:
    """USD per unit (pricing.py); None: that quantity is free, or not priced."""

    per_request: float | None = None
    per_1m_input_characters: float | None = None
    per_minute_input_audio: float | None = None
    per_minute_output_audio: float | None = None
    per_1m_input_tokens: float | None = None
    per_1m_output_tokens: float | None = None


@dataclass(frozen=True, slots=True)
class ProviderKey:
    name: str
    provider: str  # one of PROVIDERS
    api_base: str  # no trailing "/"
    api_key: str = field(repr=False)
    auth_header: str = field(repr=False)  # "Authorization: Bearer <api_key>" or (azure) "api-key: <api_key>"
    api_version: str | None = None  # azure: a dated version, or "v1"
    rate_limit: RateLimit | None = None  # the provider's quota for this key


@dataclass(frozen=True, slots=True)
class Target:
    """One deployment behind an alias: a provider key and the model id it is sent as."""

    provider_key: ProviderKey
    model_name: str
    weight: int = 1
    priority: int = 0
    pricing: Pricing | None = None  # this deployment's own prices; None: the model's
    # derived from the fields above; left out of == and hash() (a mappingproxy cannot be hashed)
    urls: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), compare=False)
    model_name_bytes: bytes = field(default=b"", compare=False)
    id: str = field(default="", compare=False)  # "<provider key>/<model_name>": cooldown keys


@dataclass(frozen=True, slots=True)
class Retry:
    max_attempts: int  # attempts in all, the first included
    replay_limit_bytes: int  # 0: uploads are never replayed


@dataclass(frozen=True, slots=True)
class Cooldown:
    failures: int = 3
    window_s: int = 60
    cooldown_s: int = 30


@dataclass(frozen=True, slots=True)
class Model:
    alias: str
    targets: tuple[Target, ...]  # one or more
    timeout_ms: int | None  # None: upstream.timeout_ms
    rate_limit: RateLimit | None
    routes: frozenset[str]  # the routes it serves (ROUTES); another route is 400 model_not_supported
    retry: Retry
    cooldown: Cooldown
    pricing: Pricing | None = None
    max_audio_seconds: int | None = None  # per upload; longer is 400 audio_too_long
    # Derived from the targets once, not per request (left out of == and hash()): the names their
    # failures and cooldowns are kept under, "<alias>|<target id>", which outlive a reload that
    # keeps the target; and the first choice while none is cooling down: the targets of the lowest
    # priority.
    cooldown_keys: tuple[str, ...] = field(init=False, compare=False, repr=False)
    first_choice: tuple[int, ...] = field(init=False, compare=False, repr=False)
    # Whether a target's provider key has an audio quota: an upload's length is then checked
    # against it too, as the key's and the model's are.
    provider_audio_quotas: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        top = min(t.priority for t in self.targets)
        object.__setattr__(self, "cooldown_keys", tuple(f"{self.alias}|{t.id}" for t in self.targets))
        object.__setattr__(self, "first_choice", tuple(i for i, t in enumerate(self.targets) if t.priority == top))
        object.__setattr__(self, "provider_audio_quotas", any(
            r is not None and (r.audio_seconds_per_hour is not None or r.audio_seconds_per_day is not None)
            for r in (t.provider_key.rate_limit for t in self.targets)))

    @property
    def provider_key(self) -> ProviderKey:
        """The first target's provider key: what listings show as ``owned_by``."""
        return self.targets[0].provider_key


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    key_hash: str
    allowed_models: tuple[str, ...]
    allowed: frozenset[str]  # the aliases of this Resources that match allowed_models
    allowed_sorted: tuple[str, ...]
    disabled: bool
    expires_at: dt.datetime | None  # aware, UTC
    rate_limit: RateLimit | None


@dataclass(frozen=True, slots=True)
class Pattern:
    kind: str
    value: str
    regex: re.Pattern[str]  # a literal is compiled escaped and case-insensitive


@dataclass(frozen=True, slots=True)
class Guardrail:
    name: str
    kind: str
    models: tuple[str, ...]
    applies_to: frozenset[str]  # the aliases that match models
    hook_point: str
    enforcement_mode: str
    patterns: tuple[Pattern, ...]


@dataclass(frozen=True, slots=True)
class Resources:
    provider_keys: Mapping[str, ProviderKey]
    models: Mapping[str, Model]
    api_keys: tuple[ApiKey, ...]
    keys_by_hash: Mapping[str, ApiKey]
    guardrails: tuple[Guardrail, ...]
    # (alias, hook point) -> the guardrails that apply, in file order; built once, read per request
    rules: Mapping[tuple[str, str], tuple[Guardrail, ...]] = field(default_factory=lambda: MappingProxyType({}))
    scans_prompts: bool = False  # some input guardrail exists: multipart prompts must be read


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ProxySettings:
    listen: Listen
    request_body_limit_bytes: int  # 0: no cap
    json_body_limit_bytes: int  # speech JSON bodies, always capped
    request_id_headers: tuple[str, ...]
    drain_timeout_ms: int = 60000  # SIGTERM: how long in-flight requests may take to finish
    drain_grace_ms: int = 5000     # SIGTERM: how long the listener stays up while busy
    keepalive_timeout_ms: int = 30000  # idle keep-alive, and the bound on a slow header phase
    cors: Cors | None = None  # None: no CORS (no preflight route, nothing added to answers)
    realtime_heartbeat_ms: int = 30000  # ping both sides of a realtime session this often; 0: never


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    connect_timeout_ms: int = 5000
    timeout_ms: int = 600000
    stream_idle_timeout_ms: int = 60000
    max_connections: int = 1000


@dataclass(frozen=True, slots=True)
class Settings:
    proxy: ProxySettings
    upstream: UpstreamSettings
    metrics_listen: Listen | None  # None: no metrics listener
    usage_sink: SinkSpec
    ratelimit_backend: BackendSpec
    usage_spill_dir: Path | None  # None: events the sink cannot take are dropped (counted)
    resources_file: Path  # absolute
    config_file: Path  # absolute
    access_log_probes: bool = False  # /livez and /readyz get access-log lines too


@dataclass(frozen=True, slots=True)
class Config:
    settings: Settings
    resources: Resources


def hash_key(key: str) -> str:
    """The key_hash of a caller key: lowercase sha256 hex of its UTF-8 bytes."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_settings(path: str | os.PathLike[str], env: Mapping[str, str]) -> Settings:
    """config.yaml alone (the resources file is not opened)."""
    out: list[str] = []
    return _checked(out, _load_settings(out, Path(path), env)[0])


def load_resources(path: str | os.PathLike[str], env: Mapping[str, str]) -> Resources:
    """resources.yaml alone: what a SIGHUP reload reads."""
    out: list[str] = []
    return _checked(out, config_resources.load(out, Path(path), env))


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Both files; the problems of both are raised together in one ConfigError."""
    env = os.environ if env is None else env
    out: list[str] = []
    settings, resources_file = _load_settings(out, Path(path), env)
    resources = config_resources.load(out, resources_file, env) if resources_file else None
    return Config(_checked(out, settings), _checked(out, resources))


def _checked(out: list[str], value: T | None) -> T:
    if out or value is None:
        raise ConfigError(out)
    return value


# -- fields of both files -----------------------------------------------------------------------

AUDIO_ROUTES = ("speech", "transcriptions", "translations")
ROUTES = (*AUDIO_ROUTES, "realtime")  # what a model's `routes` may name
PROVIDERS = ("openai", "azure")  # API flavours; a typo must never fall back to one of them
REPLAY_LIMIT = 256 * 1024 * 1024  # retry.replay_limit_bytes by default
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _listen(r: Reader, key: str, default: str) -> Listen | None:
    text = r.text(key, default)
    if text is None:
        return None
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:  # an IPv6 address needs its brackets, or the port is ambiguous
        host = ""
    if not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        r.problem(key, "must be host:port with a port from 0 to 65535 ([::1]:3000 for IPv6)")
        return None
    return Listen(host, int(port))


def _spec(r: Reader, key: str, default: str, parse: Callable[[str], T]) -> T | None:
    text = r.text(key, default)
    if text is None:
        return None
    try:
        return parse(text)
    except ValueError as exc:
        r.problem(key, str(exc))
        return None


def _cors(proxy: Reader, id_headers: tuple[str, ...]) -> Cors | None:
    sub = proxy.child("cors", ("allowed_origins",))
    if sub is None:
        return None
    origins = sub.strings("allowed_origins", ())
    try:
        return parse_cors(origins, id_headers)
    except ValueError as exc:
        sub.problem("allowed_origins", str(exc))
        return None


# -- config.yaml --------------------------------------------------------------------------------

def _load_settings(out: list[str], path: Path, env: Mapping[str, str]) -> tuple[Settings | None, Path | None]:
    """Settings (None on a problem) and the resources file path (None when it cannot be known)."""
    config_file = Path(os.path.abspath(path))
    top = read_mapping(out, config_file, env,
                       ("proxy", "upstream", "metrics", "usage", "ratelimit", "access_log", "resources_file"))
    if top is None:
        return None, None
    proxy = top.section("proxy", ("listen", "request_body_limit_bytes", "json_body_limit_bytes",
                                  "request_id_headers", "drain_timeout_ms", "drain_grace_ms", "keepalive_timeout_ms",
                                  "cors", "realtime_heartbeat_ms"))
    listen = _listen(proxy, "listen", "127.0.0.1:3000")
    body_limit = proxy.integer("request_body_limit_bytes", 0, minimum=0)
    json_limit = proxy.integer("json_body_limit_bytes", 1048576)
    id_headers = proxy.strings("request_id_headers", ("x-aisix-request-id",))
    drain_ms = proxy.integer("drain_timeout_ms", 60000, minimum=0)
    grace_ms = proxy.integer("drain_grace_ms", 5000, minimum=0)
    keepalive_ms = proxy.integer("keepalive_timeout_ms", 30000)
    heartbeat_ms = proxy.integer("realtime_heartbeat_ms", 30000, minimum=0)
    if isinstance(heartbeat_ms, int) and 0 < heartbeat_ms < 100:  # healthy peers could not keep up
        proxy.problem("realtime_heartbeat_ms", "must be 0 (off) or at least 100")
    if id_headers and not all(_TOKEN.fullmatch(h) for h in id_headers):
        proxy.problem("request_id_headers", "must be HTTP header names")
    id_headers = tuple(h.lower() for h in id_headers)
    cors_policy = _cors(proxy, id_headers)
    up = top.section("upstream", UpstreamSettings.__slots__)
    given = {name: up.integer(name, None) for name in UpstreamSettings.__slots__}
    upstream = {name: value for name, value in given.items() if value is not None}
    metrics = top.section("metrics", ("listen",))
    disabled = "listen" in metrics.raw and metrics.raw["listen"] is None
    metrics_listen = None if disabled else _listen(metrics, "listen", "127.0.0.1:9090")
    if metrics_listen and metrics_listen == listen and listen.port:
        metrics.problem("listen", "must differ from proxy.listen")
    usage = top.section("usage", ("sink", "spill_dir"))
    sink = _spec(usage, "sink", "stdout", parse_sink)
    if sink is not None and sink.kind == "file" and not os.path.isabs(sink.target):
        # Relative to config.yaml, as spill_dir and resources_file: not to the working directory
        # ("/" under systemd), so that validate, run from anywhere, checks what serve opens.
        target = os.path.abspath(config_file.parent / sink.target)
        sink = replace(sink, target=target, name=f"file:{target}")
    # Under systemd, StateDirectory= gives a writable place that outlives the process.
    state = env.get("STATE_DIRECTORY", "").split(":")[0] or str(config_file.parent)
    no_spill = "spill_dir" in usage.raw and usage.raw["spill_dir"] is None
    spill = None if no_spill else usage.text("spill_dir", os.path.join(state, "usage-spill"))
    spill_dir = Path(os.path.abspath(config_file.parent / spill)) if spill else None
    ratelimit = top.section("ratelimit", ("backend",))
    backend = _spec(ratelimit, "backend", "memory", parse_backend)
    access_log = top.section("access_log", ("probes",))
    probes = access_log.scalar("probes", False, lambda v: isinstance(v, bool), "true or false")
    name = top.text("resources_file", "resources.yaml")
    resources_file = Path(os.path.abspath(config_file.parent / name)) if name else None
    if not top.ok or listen is None or sink is None or backend is None or resources_file is None:
        return None, resources_file
    proxy_settings = ProxySettings(listen, body_limit, json_limit, id_headers, drain_ms, grace_ms, keepalive_ms,
                                   cors_policy, heartbeat_ms)
    return Settings(proxy_settings, UpstreamSettings(**upstream), metrics_listen, sink, backend, spill_dir,
                    resources_file, config_file, bool(probes)), resources_file


from . import config_resources  # noqa: E402  (it fills the dataclasses above)
