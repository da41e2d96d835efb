"""resources.yaml -> Resources: provider keys, models and their targets, caller keys, guardrails.

[core] Like config.py (whose dataclasses it fills, and whose ``load``/``load_resources`` call
``load`` here): no sockets, no clock, no asyncio; every problem is added to ``out`` and names the
file, the resource and the field, never a string value.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TypeGuard, TypeVar
from urllib.parse import quote, urlsplit

from .config import (
    AUDIO_ROUTES,
    PROVIDERS,
    REPLAY_LIMIT,
    ROUTES,
    ApiKey,
    Cooldown,
    Guardrail,
    Model,
    Pattern,
    Pricing,
    ProviderKey,
    RateLimit,
    Resources,
    Retry,
    Target,
    hash_key,
)
from .config_yaml import Reader, add_problem, got, read_mapping

T = TypeVar("T")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_API_VERSION = re.compile(r"v1|\d{4}-\d{2}-\d{2}(-preview)?")


def _present(items: Mapping[str, T | None]) -> dict[str, T]:
    """The items that were read; once no problem was found, every one."""
    return {name: item for name, item in items.items() if item is not None}


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


# -- resources.yaml -----------------------------------------------------------------------------

def _provider_key(r: Reader, name: str) -> ProviderKey | None:
    provider, base, secret = r.text("provider", options=PROVIDERS), r.text("api_base"), r.text("api_key")
    version = r.text("api_version", None)
    rate_limit = _rate_limit(r)
    if base is not None and not _http_url(base):
        r.problem("api_base", "must be an http:// or https:// URL with a host, no query or fragment")
    elif base is not None and "@" in urlsplit(base).netloc:  # never sent: the key goes in api_key
        r.problem("api_base", "must not hold credentials (user:password@); the provider's key goes in api_key")
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
        urls = {route: f"{key.api_base}/audio/{route}" for route in AUDIO_ROUTES}
        urls["realtime"] = f"{ws}/realtime?model={name}"
    elif key.api_version == "v1":
        urls = {route: f"{key.api_base}/openai/v1/audio/{route}" for route in AUDIO_ROUTES}
        urls["realtime"] = f"{ws}/openai/v1/realtime?model={name}"
    else:
        urls = {route: f"{key.api_base}/openai/deployments/{name}/audio/{route}?api-version={key.api_version}"
                for route in AUDIO_ROUTES}
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


def load(out: list[str], path: Path, env: Mapping[str, str]) -> Resources | None:
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
