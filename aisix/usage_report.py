"""What a usage-event file adds up to, by key, model or day: the sums behind `aisix usage`.

[core] Pure functions over event dicts, fed one at a time: a ``Report`` keeps one ``Totals`` per
group and nothing of the events, so a file of any size costs memory in proportion to its groups.
Reading the file and printing are the CLI's (aisix/__main__.py).

What is counted (docs/operations.md, "Summing them: `aisix usage`"):

- an **error** is an event whose status is 400 or more, or that has an ``error_code``: a speech
  stream cut after its 200 (``upstream_aborted``, ``client_timeout``) failed though its status
  did not say so;
- **audio in** is the upstream's reported ``audio_seconds`` where the event has it, else the
  gateway's measured ``audio_seconds_in`` (the figure pricing uses); **audio out** is
  ``audio_seconds_out``;
- **cost** sums ``cost_usd``. A group where no event has a cost shows none (not $0: the cost is
  unknown). ``unpriced`` counts the events of a group that succeeded but have no ``cost_usd``
  (no price configured, or a priced quantity unknown), so a sum that leaves some out says so;
- an event is counted **once**: a line the same as one among the last ``Repeats.WINDOW`` is a
  batch a file or stdout sink got again after a failed write (docs/api.md, "Each event once"),
  as the Redis sink's markers tell by the line too. Not by ``request_id``: a caller may send its
  own, the same on many requests.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime

DIMENSIONS = ("key", "model", "day")
NONE = "(none)"  # a group value the event did not have (no key matched, no alias resolved)


@dataclass(slots=True)
class Totals:
    requests: int = 0
    errors: int = 0
    audio_seconds_in: float = 0.0
    audio_seconds_out: float = 0.0
    characters: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    priced: int = 0    # events with a cost_usd
    unpriced: int = 0  # events that succeeded without one

    def add(self, other: Totals) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def parse_by(text: str) -> tuple[str, ...]:
    """``key``, ``model``, ``day`` or a pair of them (``key,model``); ValueError otherwise."""
    by = tuple(part.strip() for part in text.split(","))
    if not 1 <= len(by) <= 2 or len(set(by)) != len(by) or not set(by) <= set(DIMENSIONS):
        raise ValueError(f"--by wants one or two of {', '.join(DIMENSIONS)} (e.g. key,model), got {text!r}")
    return by


def parse_since(text: str) -> datetime:
    """A date (its midnight, UTC) or an RFC 3339 time (``Z`` or an offset; none means UTC)."""
    text = text.strip()
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        when = _utc(datetime.fromisoformat(text))
    except (ValueError, OverflowError):  # out of range once in UTC: 0001-01-01T00:00:00+01:00
        raise ValueError(f"--since wants a date (2026-12-01) or an RFC 3339 time "
                         f"(2026-12-01T08:00:00Z), got {text!r}") from None
    return when


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _number(value: object) -> float:
    """A quantity of the event; 0 when absent or not a number (bool is not one)."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def measure(event: dict) -> Totals:
    """One event as Totals (``requests`` 1). The event must have passed ``Report.add``'s checks."""
    status, code = event["status"], event.get("error_code")
    failed = status >= 400 or code is not None
    reported = event.get("audio_seconds")
    cost = event.get("cost_usd")
    priced = isinstance(cost, int | float) and not isinstance(cost, bool)
    return Totals(
        requests=1, errors=int(failed),
        audio_seconds_in=_number(reported if reported is not None else event.get("audio_seconds_in")),
        audio_seconds_out=_number(event.get("audio_seconds_out")),
        characters=int(_number(event.get("input_characters"))),
        input_tokens=int(_number(event.get("input_tokens"))),
        output_tokens=int(_number(event.get("output_tokens"))),
        cost_usd=_number(cost), priced=int(priced), unpriced=int(not priced and not failed))


class Repeats:
    """Lines seen lately, by digest: whether a line is one of the last ``WINDOW`` again. A sink
    writes a batch again right after the write that failed, so a window of lines (a 16-byte digest
    each, about 20 MiB in all with Python's overhead) finds the repeats without holding a file's
    every line."""

    WINDOW = 200_000

    def __init__(self) -> None:
        self._seen: dict[bytes, None] = {}  # in insertion order: the oldest goes first
        self.count = 0

    def again(self, line: bytes) -> bool:
        digest = hashlib.blake2b(line.rstrip(b"\n"), digest_size=16).digest()
        if digest in self._seen:
            self.count += 1
            return True
        self._seen[digest] = None
        if len(self._seen) > self.WINDOW:
            del self._seen[next(iter(self._seen))]
        return False


class Report:
    """The groups so far. ``add`` an event at a time; ``rows`` and ``total`` at the end."""

    def __init__(self, by: Sequence[str] = ("key",), since: datetime | None = None) -> None:
        self.by = tuple(by)
        self.since = since
        self.groups: dict[tuple[str, ...], Totals] = {}
        self.before_since = 0  # well-formed events older than `since`
        self.repeats = Repeats()

    def add(self, event: object, line: bytes | None = None) -> bool:
        """Count one event (once: ``line``, the event as read, is checked against the last ones);
        False when it is not a usage event (no RFC 3339 ``ts``, no integer ``status``), which the
        caller reports as malformed."""
        if not isinstance(event, dict):
            return False
        ts, status = event.get("ts"), event.get("status")
        if not isinstance(ts, str) or not isinstance(status, int) or isinstance(status, bool):
            return False
        try:
            when = _utc(datetime.fromisoformat(ts))
        except (ValueError, OverflowError):  # not a time, or one out of range once in UTC
            return False
        if line is not None and self.repeats.again(line):
            return True
        if self.since is not None and when < self.since:
            self.before_since += 1
            return True
        values = {"key": event.get("api_key"), "model": event.get("model"), "day": when.date().isoformat()}
        group = tuple(_label(values[name]) for name in self.by)
        totals = self.groups.get(group)
        if totals is None:
            totals = self.groups[group] = Totals()
        totals.add(measure(event))
        return True

    def rows(self) -> list[tuple[tuple[str, ...], Totals]]:
        return sorted(self.groups.items())

    def total(self) -> Totals:
        out = Totals()
        for totals in self.groups.values():
            out.add(totals)
        return out


def _label(value: object) -> str:
    return NONE if value is None or value == "" else str(value)


# -- rendering: strings, printed by the CLI ------------------------------------------------------

COLUMNS = ("requests", "errors", "audio_min_in", "audio_min_out", "characters",
           "input_tokens", "output_tokens", "cost_usd", "unpriced")


def _values(t: Totals) -> dict[str, float | int | None]:
    """A row's figures, in COLUMNS order; cost None where no event of the group had one."""
    return {"requests": t.requests, "errors": t.errors,
            "audio_min_in": round(t.audio_seconds_in / 60, 4),
            "audio_min_out": round(t.audio_seconds_out / 60, 4),
            "characters": t.characters, "input_tokens": t.input_tokens,
            "output_tokens": t.output_tokens,
            "cost_usd": round(t.cost_usd, 6) if t.priced else None,
            "unpriced": t.unpriced if t.priced else 0}


def as_table(report: Report) -> str:
    """Aligned columns for a terminal: one line per group, a totals line; text left, numbers right."""
    headers = [*report.by, "requests", "errors", "audio min in", "audio min out", "characters",
               "tokens in", "tokens out", "cost USD", "unpriced"]
    total = report.total()

    def cells(group: Iterable[str], t: Totals) -> list[str]:
        v = _values(t)
        return [*map(_shown, group), str(t.requests), str(t.errors), f"{t.audio_seconds_in / 60:.2f}",
                f"{t.audio_seconds_out / 60:.2f}", str(t.characters), str(t.input_tokens),
                str(t.output_tokens), "-" if v["cost_usd"] is None else f"{t.cost_usd:.4f}",
                str(v["unpriced"]) if v["unpriced"] else ""]

    body = [cells(group, t) for group, t in report.rows()]
    last = cells(["TOTAL", *[""] * (len(report.by) - 1)], total)
    widths = [max(len(row[i]) for row in (headers, *body, last)) for i in range(len(headers))]
    text = len(report.by)

    def line(row: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i < text else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *map(line, body), rule, line(last)]) + "\n"


def _shown(value: str) -> str:
    """A key or model name for the terminal: the caller chose the alias, so a control character
    (an escape sequence, a line break) is written as its JSON escape, never sent to the terminal."""
    return value if value.isprintable() else json.dumps(value)[1:-1]


def as_csv(report: Report) -> str:
    """One row per group, no totals row (a spreadsheet sums a column itself); cost empty when
    unknown; minutes to 4 decimals, cost to 6."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*report.by, *COLUMNS])
    for group, t in report.rows():
        writer.writerow([*(_cell(name) for name in group), *("" if v is None else v for v in _values(t).values())])
    return out.getvalue()


def _cell(name: str) -> str:
    """A key or model name for a spreadsheet: the caller chose the alias, and a cell starting with
    = + - @ (or a tab or carriage return) is a formula there (=HYPERLINK(...)): it gets a leading
    quote, the usual guard, which a spreadsheet shows and a script can strip."""
    return "'" + name if name[:1] in ("=", "+", "-", "@", "\t", "\r") else name


def as_json(report: Report) -> str:
    """``{"by": [...], "groups": [{<dimension>: value, ..., <column>: n}], "total": {...}}``."""
    groups = [{**dict(zip(report.by, group, strict=True)), **_values(t)} for group, t in report.rows()]
    doc = {"by": list(report.by), "since": None if report.since is None else _rfc3339(report.since),
           "groups": groups, "total": _values(report.total())}
    return json.dumps(doc, indent=2) + "\n"


def _rfc3339(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


FORMATS = {"table": as_table, "csv": as_csv, "json": as_json}
