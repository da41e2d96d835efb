"""Config files -> frozen, indexed dataclasses, strictly; reads only the files and env it is given.

Every problem is collected before one ConfigError is raised; each names file, resource and field,
and none echoes a string value (it may be a secret). This module says which fields exist, their
defaults and what they become; how a field is read (types, ``${VAR}``, repeated keys) is
config_yaml.py.

[core] No sockets, no clock, no asyncio: when to (re)load and what to do with a ConfigError is
the caller's business.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TypeGuard, TypeVar
from urllib.parse import quote, urlsplit

from .config_yaml import Reader, add_problem, got, read_mapping
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
    return _checked(out, _load_resources(out, Path(path), env))


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Both files; the problems of both are raised together in one ConfigError."""
    env = os.environ if env is None else env
    out: list[str] = []
    settings, resources_file = _load_settings(out, Path(path), env)
    resources = _load_resources(out, resources_file, env) if resources_file else None
    return Config(_checked(out, settings), _checked(out, resources))


def _present(items: Mapping[str, T | None]) -> dict[str, T]:
    """The items that were read; once no problem was found, every one."""
    return {name: item for name, item in items.items() if item is not None}


def _checked(out: list[str], value: T | None) -> T:
    if out or value is None:
        raise ConfigError(out)
    return value


# -- fields of both files -----------------------------------------------------------------------

_ROUTES = ("speech", "transcriptions", "translations")
ROUTES = (*_ROUTES, "realtime")  # what a model's `routes` may name
PROVIDERS = ("openai", "azure")  # API flavours; a typo must never fall back to one of them
REPLAY_LIMIT = 256 * 1024 * 1024  # retry.replay_limit_bytes by default
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_API_VERSION = re.compile(r"v1|\d{4}-\d{2}-\d{2}(-preview)?")


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


def _rate_limit(r: Reader) -> RateLimit | None:
    fields = RateLimit.__slots__
    sub = r.child("rate_limit", fields)
    if sub is None:
        return None
    values = {name: _number(sub, name) if name.startswith("cost_") else sub.integer(name, None) for name in fields}
    return RateLimit(**values) if any(values.values()) else None  # type: ignore[arg-type]


def _number(r: Reader, key: str) -> float | None:
    """A positive number (an integer or a decimal), as a float; None when absent."""
    value = r.scalar(key, None, lambda v: _finite(v) and v > 0, "a positive number")
    return None if value is None else float(value)


def _finite(v: object) -> TypeGuard[int | float]:
    """A YAML number (true and false are bools, not numbers here) that is not inf or nan."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _pricing(r: Reader) -> Pricing | None:
    sub = r.child("pricing", Pricing.__slots__)
    if sub is None:
        return None
    values = {name: sub.scalar(name, None, lambda v: _finite(v) and v >= 0,
                               "a number >= 0 (USD)") for name in Pricing.__slots__}
    return Pricing(**{k: None if v is None else float(v) for k, v in values.items()})


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
                                  "cors"))
    listen = _listen(proxy, "listen", "127.0.0.1:3000")
    body_limit = proxy.integer("request_body_limit_bytes", 0, minimum=0)
    json_limit = proxy.integer("json_body_limit_bytes", 1048576)
    id_headers = proxy.strings("request_id_headers", ("x-aisix-request-id",))
    drain_ms = proxy.integer("drain_timeout_ms", 60000, minimum=0)
    grace_ms = proxy.integer("drain_grace_ms", 5000, minimum=0)
    keepalive_ms = proxy.integer("keepalive_timeout_ms", 30000)
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
                                   cors_policy)
    return Settings(proxy_settings, UpstreamSettings(**upstream), metrics_listen, sink, backend, spill_dir,
                    resources_file, config_file, bool(probes)), resources_file


# -- resources.yaml -----------------------------------------------------------------------------

def _provider_key(r: Reader, name: str) -> ProviderKey | None:
    provider, base, secret = r.text("provider", options=PROVIDERS), r.text("api_base"), r.text("api_key")
    version = r.text("api_version", None)
    rate_limit = _rate_limit(r)
    if base is not None and not _http_url(base):
        r.problem("api_base", "must be an http:// or https:// URL with a host, no query or fragment")
    if secret is not None and not (secret.isascii() and secret.isprintable()):
        r.problem("api_key", "must be printable ASCII (it goes into a header)")
    if provider == "azure" and version is None:
        r.problem("api_version", 'required for provider azure: a dated version such as "2024-10-21", or "v1"')
    elif provider != "azure" and version is not None:
        r.problem("api_version", "must be given only for provider azure")
    elif version is not None and not _API_VERSION.fullmatch(version):
        r.problem("api_version", 'must be "v1" or a version such as "2024-10-21" or "2025-03-01-preview"')
    if not r.ok:
        return None
    header = f"api-key: {secret}" if provider == "azure" else f"Authorization: Bearer {secret}"
    return ProviderKey(name, provider, base.rstrip("/"), secret, header, version, rate_limit)


def _http_url(text: str) -> bool:
    try:
        url = urlsplit(text)
        _ = url.port  # raises on a port that is not a number from 0 to 65535
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.hostname) and not url.query and not url.fragment


def urls_for(key: ProviderKey, model_name: str) -> Mapping[str, str]:
    """Where each audio route of this deployment is sent; ``realtime`` is the WebSocket URL with
    the query that names the deployment (realtime.py adds ``intent`` when the caller sent one)."""
    ws = "wss://" + key.api_base[len("https://"):] if key.api_base.startswith("https://") \
        else "ws://" + key.api_base[len("http://"):]
    name = quote(model_name, safe="")
    if key.provider != "azure":
        urls = {route: f"{key.api_base}/audio/{route}" for route in _ROUTES}
        urls["realtime"] = f"{ws}/realtime?model={name}"
    elif key.api_version == "v1":
        urls = {route: f"{key.api_base}/openai/v1/audio/{route}" for route in _ROUTES}
        urls["realtime"] = f"{ws}/openai/v1/realtime?model={name}"
    else:
        urls = {route: f"{key.api_base}/openai/deployments/{name}/audio/{route}?api-version={key.api_version}"
                for route in _ROUTES}
        urls["realtime"] = f"{ws}/openai/realtime?api-version={key.api_version}&deployment={name}"
    return MappingProxyType(urls)


def _target(r: Reader, keys: Mapping[str, ProviderKey | None], key_name: str | None, model_name: str | None,
            weight: int | None = 1, priority: int | None = 0, label: str = "provider_key",
            pricing: Pricing | None = None) -> Target | None:
    if key_name is not None and key_name not in keys:
        r.problem(label, f"no provider key named '{key_name}'")
    key = keys.get(key_name) if key_name is not None else None
    if key is None or model_name is None or weight is None or priority is None:
        return None
    return Target(key, model_name, weight, priority, pricing, urls_for(key, model_name), model_name.encode("utf-8"),
                  f"{key.name}/{model_name}")


def _model(r: Reader, name: str, keys: Mapping[str, ProviderKey | None]) -> Model | None:
    given = [k for k in ("provider_key", "targets") if r.raw.get(k) is not None]
    if len(given) != 1:
        r.problem("provider_key", "exactly one of provider_key (with model_name) or targets is required, "
                  + ("both were given" if given else "neither was given"))
    timeout, rate_limit = r.integer("timeout", None), _rate_limit(r)
    routes = r.strings("routes", ROUTES)
    if not routes or not set(routes) <= set(ROUTES):
        r.problem("routes", "must be a non-empty list of " + ", ".join(f"'{o}'" for o in ROUTES))
    targets: list[Target | None] = []
    if r.raw.get("targets") is None:
        targets.append(_target(r, keys, r.text("provider_key", None), r.text("model_name")))
    else:
        if r.raw.get("model_name") is not None:
            r.problem("model_name", "goes in each of targets, not beside them")
        raw = r.raw["targets"]
        if not isinstance(raw, list) or not raw:
            r.problem("targets", f"must be a non-empty list of {{provider_key, model_name, weight, priority}}, "
                      f"{got(raw)}")
        for i, item in enumerate(raw if isinstance(raw, list) else ()):
            t = r.nested(f"targets[{i}]", item, ("provider_key", "model_name", "weight", "priority", "pricing"))
            if t is not None:
                targets.append(_target(t, keys, t.text("provider_key"), t.text("model_name"), t.integer("weight", 1),
                                       t.integer("priority", 0, minimum=0), pricing=_pricing(t)))
        ids = [x.id for x in targets if x is not None]
        if len(set(ids)) != len(ids):
            r.problem("targets", "each target must be a different provider_key and model_name")
    retry = r.child("retry", ("max_attempts", "replay_limit_bytes"))
    attempts = retry.integer("max_attempts", len(targets) or 1) if retry else len(targets) or 1
    replay = retry.integer("replay_limit_bytes", REPLAY_LIMIT, minimum=0) if retry else REPLAY_LIMIT
    cool = r.child("cooldown", Cooldown.__slots__)
    default = Cooldown()
    cooldown = Cooldown(*(cool.integer(f, getattr(default, f)) for f in Cooldown.__slots__)) if cool else default
    pricing, max_seconds = _pricing(r), r.integer("max_audio_seconds", None)
    if not r.ok or not targets or None in targets:
        return None
    return Model(name, tuple(t for t in targets if t is not None), timeout, rate_limit, frozenset(routes),
                 Retry(attempts, replay), cooldown, pricing, max_seconds)


def _matching(globs: tuple[str, ...], aliases: Iterable[str]) -> frozenset[str]:
    return frozenset(a for a in aliases if any(fnmatch.fnmatchcase(a, g) for g in globs))


def _api_key(r: Reader, name: str, aliases: tuple[str, ...]) -> ApiKey | None:
    given = [k for k in ("key_hash", "key_env") if r.raw.get(k) is not None]
    if len(given) != 1:
        r.problem("key_hash", "exactly one of key_hash or key_env is required, "
                  + ("both were given" if given else "neither was given"))
    key_hash, key_env = r.text("key_hash", None), r.text("key_env", None)
    if key_hash is not None:
        key_hash = key_hash.lower()
        if not _HEX64.fullmatch(key_hash):
            r.problem("key_hash", "must be 64 hex digits (the sha256 that `aisix hash-key` prints)")
    if key_env is not None:
        if not r.env.get(key_env):
            r.problem("key_env", f"environment variable '{key_env}' is not set or empty")
        else:
            key_hash = hash_key(r.env[key_env])
    globs = r.strings("allowed_models", ())
    disabled = r.scalar("disabled", False, lambda v: isinstance(v, bool), "true or false")
    rate_limit = _rate_limit(r)
    expires_at = r.timestamp("expires_at")
    if not r.ok:
        return None
    allowed = _matching(globs, aliases)
    return ApiKey(name, key_hash, globs, allowed, tuple(sorted(allowed)), disabled, expires_at, rate_limit)


def _guardrail(r: Reader, name: str, aliases: tuple[str, ...]) -> Guardrail | None:
    kind = r.text("kind", options=("keyword",))
    globs = r.strings("models", ("*",))
    hook_point = r.text("hook_point", options=("input", "output"))
    mode = r.text("enforcement_mode", options=("block", "monitor"))
    raw, patterns = r.raw.get("patterns"), []
    if not isinstance(raw, list) or not raw:
        r.problem("patterns", f"must be a non-empty list of {{kind, value}}, {got(raw)}")
    for i, item in enumerate(raw if isinstance(raw, list) else ()):
        p = r.nested(f"patterns[{i}]", item, ("kind", "value"))
        if p is None:
            continue
        p_kind, value = p.text("kind", options=("literal", "regex")), p.text("value")
        if p_kind == "literal" and value:
            patterns.append(Pattern(p_kind, value, re.compile(re.escape(value), re.IGNORECASE)))
        elif p_kind == "regex" and value:
            try:
                patterns.append(Pattern(p_kind, value, re.compile(value)))
            except re.error as e:
                p.problem("value", f"invalid regex: {e.msg} at position {e.pos}")
    if not r.ok:
        return None
    return Guardrail(name, kind, globs, _matching(globs, aliases), hook_point, mode, tuple(patterns))


def _load_resources(out: list[str], path: Path, env: Mapping[str, str]) -> Resources | None:
    top = read_mapping(out, path, env,
                       ("_format_version", "provider_keys", "models", "api_keys", "guardrails"))
    if top is None:
        return None
    if top.text("_format_version", "1") not in ("1", None):
        top.problem("_format_version", 'must be "1"')
    key_fields = ("provider", "api_base", "api_key", "api_version", "rate_limit")
    model_fields = ("provider_key", "model_name", "targets", "routes", "timeout", "rate_limit", "retry", "cooldown",
                    "pricing", "max_audio_seconds")
    keys = top.collect("provider_keys", "display_name", key_fields, _provider_key)
    models = top.collect("models", "display_name", model_fields, lambda r, name: _model(r, name, keys))
    aliases = tuple(models)
    api_keys = top.collect("api_keys", "display_name",
                           ("key_hash", "key_env", "allowed_models", "rate_limit", "disabled", "expires_at"),
                           lambda r, name: _api_key(r, name, aliases))
    guardrails = top.collect("guardrails", "name",
                             ("kind", "models", "hook_point", "enforcement_mode", "patterns"),
                             lambda r, name: _guardrail(r, name, aliases))
    by_hash: dict[str, ApiKey] = {}
    for key in filter(None, api_keys.values()):
        if key.key_hash in by_hash:
            add_problem(out, top.file, f"api_keys[{key.name}]", None,
                        f"same caller key (key_hash/key_env) as api_keys[{by_hash[key.key_hash].name}]")
        by_hash.setdefault(key.key_hash, key)
    if not top.ok:  # so no item is None from here on
        return None
    rails = tuple(_present(guardrails).values())
    rules = {(alias, hook): tuple(g for g in rails if g.hook_point == hook and alias in g.applies_to)
             for alias in models for hook in ("input", "output")}
    return Resources(MappingProxyType(_present(keys)), MappingProxyType(_present(models)),
                     tuple(_present(api_keys).values()), MappingProxyType(by_hash), rails,
                     MappingProxyType({k: v for k, v in rules.items() if v}),
                     any(g.hook_point == "input" for g in rails))
