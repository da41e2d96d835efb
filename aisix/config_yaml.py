"""Strict YAML reading for the config files: typed, ${VAR}-substituted getters; knows no schema.

[core], except that ``read_mapping`` reads the one file it is given; no sockets, no clock, no
asyncio. config.py says which fields exist and what they become; this module says how a field is
read. A repeated key is refused (PyYAML would keep the last one). A problem is recorded in the
caller's list, never raised, so every problem of a file is reported at once. Each names file,
resource and field, and none echoes a string value (it may be a secret): ``got`` describes a value
by its type. ``${VAR}`` is substituted in parsed string scalars, never in the raw YAML text.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_REQUIRED: Any = object()
_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")


def got(value: object) -> str:
    """What was found, for a message: integers as themselves, anything else only by its type."""
    if isinstance(value, bool):
        return "got a boolean"
    if isinstance(value, int):
        return f"got {value}"
    kinds = {str: "a string", list: "a list", dict: "a mapping", float: "a number",
             dt.datetime: "a timestamp", dt.date: "a date", type(None): "null"}
    if isinstance(value, str) and _numeric(value):  # 6e-3: YAML 1.1 wants a '.' in a float
        return "got a string that reads as a number (YAML takes 6e-3 as text: write 0.006 or 6.0e-3)"
    return "got " + kinds.get(type(value), type(value).__name__)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # what YAML 1.2 reads as a number (not nan, inf, 1_000)


def _numeric(text: str) -> bool:
    return _NUMBER.fullmatch(text.strip()) is not None


def add_problem(out: list[str], file: str, resource: str, key: str | None, message: str) -> None:
    parts = [file, resource] if resource else [file]
    if key is not None:
        parts.append(f"field '{key}'")
    out.append(": ".join([*parts, message]))


class Reader:
    """Typed, substituted access to one YAML mapping; a problem is recorded, never raised."""

    def __init__(self, out: list[str], file: str, resource: str, raw: object,
                 env: Mapping[str, str], fields: Iterable[str], prefix: str = "") -> None:
        self.out, self.file, self.resource, self.env, self.prefix = out, file, resource, env, prefix
        self.start = len(out)
        self.raw: dict[Any, Any] = raw if isinstance(raw, dict) else {}
        allowed = set(fields)
        for key in self.raw:
            if key not in allowed:
                self.problem(str(key), "unknown field")

    @property
    def ok(self) -> bool:
        """No problem recorded since this reader was made (nested readers included)."""
        return len(self.out) == self.start

    def problem(self, key: str | None, message: str) -> None:
        add_problem(self.out, self.file, self.resource, None if key is None else self.prefix + key, message)

    def section(self, name: str, fields: Iterable[str]) -> Reader:
        """A reader for the mapping under name whose problems name it as their resource; an empty
        one when it is absent or not a mapping, so its defaults still apply."""
        raw = self.raw.get(name)
        if raw is not None and not isinstance(raw, dict):
            self.problem(name, f"must be a mapping, {got(raw)}")
        return Reader(self.out, self.file, name, raw, self.env, fields)

    def child(self, key: str, fields: Iterable[str]) -> Reader | None:
        """The mapping under key; None when it is absent, null or not a mapping."""
        value = self.raw.get(key)
        return None if value is None else self.nested(key, value, fields)

    def nested(self, label: str, value: object, fields: Iterable[str]) -> Reader | None:
        """A reader for value, whose problems name `label.<field>`; None when not a mapping."""
        if not isinstance(value, dict):
            self.problem(label, f"must be a mapping, {got(value)}")
            return None
        return Reader(self.out, self.file, self.resource, value, self.env, fields,
                      f"{self.prefix}{label}.")

    def collect(self, section: str, name_field: str, fields: tuple[str, ...],
                build: Callable[[Reader, str], T | None]) -> dict[str, T | None]:
        """The items of one list section by name, each checked, duplicates refused; None for an item
        with a problem, so a reference to it is not reported a second time."""
        raw = self.raw.get(section)
        if raw is not None and not isinstance(raw, list):
            self.problem(section, f"must be a list, {got(raw)}")
        built: dict[str, T | None] = {}
        first: dict[str, int] = {}
        for i, item in enumerate(raw if isinstance(raw, list) else ()):
            name = item.get(name_field) if isinstance(item, dict) else None
            label = f"{section}[{name}]" if isinstance(name, str) and name else f"{section}[{i}]"
            if not isinstance(item, dict):
                add_problem(self.out, self.file, label, None, f"must be a mapping, {got(item)}")
                continue
            r = Reader(self.out, self.file, label, item, self.env, (name_field, *fields))
            name = r.text(name_field)
            if name is not None and name in first:
                r.problem(name_field, f"duplicate: {section}[{first[name]}] has the same {name_field}")
            elif name is not None:
                first[name] = i
            obj = build(r, name)
            if name is not None:
                built.setdefault(name, obj if r.ok else None)
        return built

    def string(self, key: str, value: object) -> str | None:
        """value as a non-empty string with ${VAR} substituted, or None once the problem is noted."""
        if not isinstance(value, str):
            self.problem(key, f"must be a string, {got(value)}")
            return None
        failed = False

        def substitute(m: re.Match[str]) -> str:
            nonlocal failed
            name, default = m.group(1), m.group(2)
            if m.group(0) == "$${":
                return "${"
            if name is None:
                self.problem(key, "malformed ${...}: write ${NAME}, ${NAME:-default} or $${ for a literal")
            elif default is not None and not self.env.get(name):
                return default
            elif name in self.env:
                return self.env[name]
            else:
                self.problem(key, f"environment variable '{name}' is not set")
            failed = True
            return ""

        text = _VAR.sub(substitute, value)
        if not failed and not text:
            self.problem(key, "must not be empty")
        return None if failed or not text else text

    def text(self, key: str, default: Any = _REQUIRED, options: tuple[str, ...] = ()) -> Any:
        """A string field (null counts as absent); with options, one of them."""
        value = self.raw.get(key)
        if value is None:
            if default is _REQUIRED:
                self.problem(key, "required")
                return None
            return default
        text = self.string(key, value)
        if options and text is not None and text not in options:
            self.problem(key, "must be one of " + ", ".join(f"'{o}'" for o in options))
            return None
        return text

    def scalar(self, key: str, default: Any, valid: Callable[[object], bool], what: str) -> Any:
        """A non-string field (null counts as absent): the value if valid(value), else None."""
        value = self.raw.get(key)
        if value is None:
            return default
        if not valid(value):
            self.problem(key, f"must be {what}, {got(value)}")
            return None
        return value

    def integer(self, key: str, default: int | None, minimum: int = 1) -> Any:
        # type() rather than isinstance(): YAML's true/false are bools, and bool is an int.
        return self.scalar(key, default, lambda v: type(v) is int and v >= minimum,
                           "a positive integer" if minimum == 1 else "an integer >= 0")

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """A list of strings; on a problem (recorded) the default, never to be used."""
        value = self.raw.get(key)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            kind = "" if isinstance(value, list) else f", {got(value)}"
            self.problem(key, f"must be a list of strings{kind}")
            return default
        items = [self.string(f"{key}[{i}]", v) for i, v in enumerate(value)]
        return tuple(i for i in items if i is not None)

    def timestamp(self, key: str) -> dt.datetime | None:
        """An RFC 3339 string, or the datetime YAML makes of an unquoted one; naive means UTC."""
        value = self.raw.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            text = self.string(key, value)
            if text is None:
                return None
            try:
                if not _RFC3339.fullmatch(text):
                    raise ValueError(text)
                value = dt.datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
            except ValueError:
                self.problem(key, "must be an RFC 3339 timestamp such as 2027-01-01T00:00:00Z")
                return None
        elif not isinstance(value, dt.datetime):
            self.problem(key, f"must be an RFC 3339 timestamp, {got(value)}")
            return None
        return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a repeated key (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"repeated key '{key}'", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_mapping(out: list[str], path: Path, env: Mapping[str, str], fields: Iterable[str]) -> Reader | None:
    """A reader for a whole file, or None once why it cannot be read is recorded."""
    try:
        doc = yaml.load(path.read_bytes(), Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except OSError as e:
        out.append(f"{path.name}: cannot read {path}: {e.strerror}")
    except yaml.MarkedYAMLError as e:
        # str(e) quotes the offending line, which may hold a secret: position and reason only.
        mark = e.problem_mark or e.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        out.append(f"{path.name}: {at}invalid YAML: {e.problem or e.context}")
    except yaml.YAMLError as e:
        out.append(f"{path.name}: invalid YAML: {type(e).__name__}")
    else:
        if doc is None or isinstance(doc, dict):
            return Reader(out, path.name, "", doc, env, fields)
        out.append(f"{path.name}: the top level must be a mapping, {got(doc)}")
    return None
