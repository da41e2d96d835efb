"""`aisix usage`: the sums of aisix.usage_report checked against the events they came from, made
by hand and by a real gateway, and the command run as a subprocess (files, stdin, gzip, bad lines)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from aisix import usage_report
from aisix.usage_report import Report, Totals, measure, parse_by, parse_since
from tests.gateway import ROOT, TEAM_A, Gateway


def ev(ts: str = "2026-12-01T10:00:00.000Z", key: str | None = "team-a", model: str | None = "tts-prod",
       status: int = 200, error_code: str | None = None, **quantities: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"ts": ts, "request_id": "r", "route": "speech", "api_key": key,
                             "status": status, "error_code": error_code, **quantities}
    if model is not None:
        event["model"] = model
    return event


# Four keys' worth of traffic over two days; every quantity appears at least twice.
EVENTS = [
    ev(input_characters=100, audio_seconds_out=6.0, cost_usd=0.0015),
    ev(ts="2026-12-01T23:59:59.999Z", input_characters=50, audio_seconds_out=3.0, cost_usd=0.00075),
    ev(ts="2026-12-02T00:00:00.000Z", model="whisper-prod", audio_seconds=61.0, audio_seconds_in=60.4,
       cost_usd=0.0061),
    ev(ts="2026-12-02T01:00:00.000Z", model="whisper-prod", audio_seconds_in=30.0, input_tokens=40,
       output_tokens=9),  # succeeded, no cost: unpriced
    ev(key="team-b", model="whisper-prod", audio_seconds_in=12.0, input_tokens=20, output_tokens=4, cost_usd=0.002),
    ev(key="team-b", status=429, error_code="rate_limit_exceeded"),
    ev(key=None, model=None, status=401, error_code="invalid_api_key"),
    ev(ts="2026-12-02T08:00:00+02:00", key="team-b", status=200, error_code="upstream_aborted",
       input_characters=10, cost_usd=0.0001),  # a stream cut after its 200: an error, still billed
]


@pytest.mark.parametrize(("event", "expected"), [
    (ev(), Totals(requests=1, unpriced=1)),
    (ev(status=404, error_code="model_not_found"), Totals(requests=1, errors=1)),
    (ev(status=499, error_code="client_closed", cost_usd=0.5), Totals(requests=1, errors=1, cost_usd=0.5, priced=1)),
    (ev(error_code="client_timeout"), Totals(requests=1, errors=1)),  # 200 already sent, then cut
    (ev(status=500), Totals(requests=1, errors=1)),  # an error without a code is still one
    (ev(audio_seconds=10.0, audio_seconds_in=9.5), Totals(requests=1, audio_seconds_in=10.0, unpriced=1)),
    (ev(audio_seconds_in=9.5), Totals(requests=1, audio_seconds_in=9.5, unpriced=1)),
    (ev(audio_seconds_out=2.5, input_characters=7, cost_usd=0),
     Totals(requests=1, audio_seconds_out=2.5, characters=7, priced=1)),  # $0 is a price
    (ev(input_tokens=3, output_tokens=4, total_tokens=7), Totals(requests=1, input_tokens=3, output_tokens=4, unpriced=1)),
    (ev(cost_usd=True, input_characters="12"), Totals(requests=1, unpriced=1)),  # not numbers: not counted
])
def test_one_event(event: dict[str, Any], expected: Totals) -> None:
    assert measure(event) == expected


def by_hand(by: tuple[str, ...], events: list[dict[str, Any]]) -> dict[tuple[str, ...], dict[str, float]]:
    """The same sums, written out plainly from the rules in the module's docstring."""
    out: dict[tuple[str, ...], dict[str, float]] = {}
    for e in events:
        day = datetime.fromisoformat(e["ts"]).astimezone(UTC).date().isoformat()
        values = {"key": e["api_key"] or "(none)", "model": e.get("model") or "(none)", "day": day}
        g = out.setdefault(tuple(values[d] for d in by), dict.fromkeys(
            ("requests", "errors", "in", "out", "chars", "tin", "tout", "cost", "priced", "unpriced"), 0))
        failed = e["status"] >= 400 or e["error_code"] is not None
        g["requests"] += 1
        g["errors"] += failed
        g["in"] += e["audio_seconds"] if "audio_seconds" in e else e.get("audio_seconds_in", 0)
        g["out"] += e.get("audio_seconds_out", 0)
        g["chars"] += e.get("input_characters", 0)
        g["tin"] += e.get("input_tokens", 0)
        g["tout"] += e.get("output_tokens", 0)
        g["cost"] += e.get("cost_usd", 0)
        g["priced"] += "cost_usd" in e
        g["unpriced"] += "cost_usd" not in e and not failed
    return out


@pytest.mark.parametrize("by", ["key", "model", "day", "key,model", "model,key", "key,day", "day,model"])
def test_groups_add_up_to_the_events(by: str) -> None:
    report = Report(parse_by(by))
    assert all(report.add(e) for e in EVENTS)
    expected = by_hand(parse_by(by), EVENTS)
    assert [group for group, _ in report.rows()] == sorted(expected)
    for group, t in report.rows():
        g = expected[group]
        assert (t.requests, t.errors, t.characters, t.input_tokens, t.output_tokens, t.priced, t.unpriced) == (
            g["requests"], g["errors"], g["chars"], g["tin"], g["tout"], g["priced"], g["unpriced"])
        assert (t.audio_seconds_in, t.audio_seconds_out, t.cost_usd) == pytest.approx((g["in"], g["out"], g["cost"]))
    total = report.total()
    assert (total.requests, total.errors, total.unpriced) == (8, 3, 1)
    assert total.audio_seconds_in == pytest.approx(61.0 + 30.0 + 12.0)  # reported 61 beat measured 60.4
    assert total.cost_usd == pytest.approx(0.0015 + 0.00075 + 0.0061 + 0.002 + 0.0001)


def test_days_are_utc() -> None:
    report = Report(("day",))
    for e in EVENTS:
        report.add(e)
    # 23:59:59.999Z is still the 1st; 08:00+02:00 is 06:00Z on the 2nd
    assert {group: t.requests for group, t in report.rows()} == {("2026-12-01",): 5, ("2026-12-02",): 3}


@pytest.mark.parametrize(("since", "requests"), [
    ("2026-12-01", 8), ("2026-12-02", 3), ("2026-12-02T00:00:00Z", 3), ("2026-12-02T00:00:00.001Z", 2),
    ("2026-12-02T03:00:00+02:00", 2), ("2026-12-02T05:59:59", 1), ("2026-12-02T06:00:01Z", 0),
])
def test_since(since: str, requests: int) -> None:
    report = Report(("key",), parse_since(since))
    assert all(report.add(e) for e in EVENTS)
    assert report.total().requests == requests
    assert report.before_since == 8 - requests


@pytest.mark.parametrize("text", ["", "key,", "keys", "key,model,day", "day,day", "key;model"])
def test_by_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="--by wants"):
        parse_by(text)


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "12/01/2026", "", "0001-01-01T00:00:00+01:00"])
def test_since_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="--since wants"):
        parse_since(text)


@pytest.mark.parametrize("event", [
    [], "x", 3, None, {}, {"ts": "2026-12-01T10:00:00Z"}, {"status": 200},
    {"ts": "yesterday", "status": 200}, {"ts": "2026-12-01T10:00:00Z", "status": "200"},
    {"ts": "2026-12-01T10:00:00Z", "status": True}, {"ts": 1764583200, "status": 200},
])
def test_not_a_usage_event(event: object) -> None:
    report = Report()
    assert report.add(event) is False
    assert report.groups == {}


def report_of(by: str = "key,model") -> Report:
    report = Report(parse_by(by))
    for e in EVENTS:
        report.add(e)
    return report


def test_table_is_aligned_with_a_totals_row() -> None:
    lines = usage_report.as_table(report_of()).splitlines()
    header, rule, *rows, rule2, total = lines
    assert header.split()[:4] == ["key", "model", "requests", "errors"]
    assert rule == rule2 and set(rule) == {"-", " "}
    assert len(rows) == 5 and total.startswith("TOTAL ")
    # every column starts (text) or ends (numbers) where the rule's dashes do
    spans = [(i, i + len(dashes)) for i, dashes in _runs(rule)]
    for line in [header, *rows, total]:
        padded = line.ljust(len(rule))
        assert len(padded) == len(rule), line
        for n, (start, end) in enumerate(spans):
            cell = padded[start:end]
            assert padded[end:end + 2].strip() == "", (line, n)  # the gap between columns
            if cell.strip() and n >= 2:
                assert cell[-1] != " ", (line, n)  # numbers end at the column's right edge
            elif cell.strip():
                assert cell[0] != " ", (line, n)  # text starts at its left edge
    by_group = {tuple(line.split()[:2]): line.split() for line in rows}
    assert by_group[("team-a", "tts-prod")][2:] == ["2", "0", "0.00", "0.15", "150", "0", "0", "0.0023"]
    assert by_group[("team-a", "whisper-prod")][2:] == ["2", "0", "1.52", "0.00", "0", "40", "9", "0.0061", "1"]
    assert by_group[("(none)", "(none)")][2:] == ["1", "1", "0.00", "0.00", "0", "0", "0", "-"]
    assert total.split()[1:] == ["8", "3", "1.72", "0.15", "160", "60", "13", "0.0104", "1"]  # 0.01045 in binary is a hair under


def _runs(rule: str) -> list[tuple[int, str]]:
    out, i = [], 0
    for part in rule.split("  "):
        out.append((i, part))
        i += len(part) + 2
    return out


def test_csv_has_one_row_per_group() -> None:
    rows = list(csv.DictReader(io.StringIO(usage_report.as_csv(report_of("model")))))
    assert [row["model"] for row in rows] == ["(none)", "tts-prod", "whisper-prod"]
    assert rows[0]["cost_usd"] == ""  # unknown, not 0
    tts = rows[1]
    assert (tts["requests"], tts["errors"], tts["characters"]) == ("4", "2", "160")
    assert float(tts["audio_min_out"]) == pytest.approx(9 / 60, abs=1e-4)
    assert float(tts["cost_usd"]) == pytest.approx(0.00235)
    assert list(rows[2]) == ["model", *usage_report.COLUMNS]


def test_json_groups_and_total() -> None:
    doc = json.loads(usage_report.as_json(report_of("day")))
    assert doc["by"] == ["day"] and doc["since"] is None
    assert [g["day"] for g in doc["groups"]] == ["2026-12-01", "2026-12-02"]
    assert sum(g["requests"] for g in doc["groups"]) == doc["total"]["requests"] == 8
    assert doc["total"]["audio_min_in"] == pytest.approx(103 / 60, abs=1e-4)
    assert doc["total"]["unpriced"] == 1


# -- the command, as a subprocess --------------------------------------------------------------

def aisix_usage(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "aisix", "usage", *args], input=stdin,
                          capture_output=True, cwd=ROOT, timeout=60, check=False)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def jsonl(events: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


def test_cli_reads_a_file_stdin_and_gzip_alike(tmp_path: Path) -> None:
    plain = tmp_path / "usage.jsonl"
    plain.write_bytes(jsonl(EVENTS))
    zipped = tmp_path / "usage.jsonl.1.gz"
    zipped.write_bytes(gzip.compress(jsonl(EVENTS)))
    expected = usage_report.as_table(report_of("key"))
    for args, stdin in [((str(plain),), b""), (("-",), jsonl(EVENTS)), ((str(zipped),), b"")]:
        done = aisix_usage(*args, stdin=stdin)
        assert (done.returncode, done.stderr, done.stdout) == (0, "", expected)
    both = aisix_usage(str(plain), str(zipped), "--format", "json")
    # The same lines twice (a rotated copy made while the file was written, say): counted once.
    assert json.loads(both.stdout)["total"]["requests"] == 8
    assert both.stderr == ("aisix usage: counted 8 event(s) written twice once (the same line again: "
                           "a batch a sink wrote again after a failed write)\n")


def test_cli_skips_malformed_lines_and_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    good = jsonl(EVENTS[:3])
    out_of_range = b'{"ts": "0001-01-01T00:00:00+01:00", "status": 200}\n'  # a year 0 in UTC: it crashed
    path.write_bytes(good + b"not json\n" + b"[1, 2]\n" + b"\xff\xfe\n" + b"\n" + out_of_range + jsonl(EVENTS[3:])
                     + b'{"ts": "2026-12-02T09:00:00.000Z", "sta')
    done = aisix_usage(str(path), "--by", "day", "--format", "csv")
    assert done.returncode == 0
    assert sum(int(row["requests"]) for row in csv.DictReader(io.StringIO(done.stdout))) == 8
    assert done.stderr.splitlines() == [
        "aisix usage: skipped an incomplete last line in 1 file(s) (an event still being written?)",
        f"aisix usage: skipped 5 malformed line(s), not usage events (the first at {path}:4)",
    ]


def test_an_event_written_twice_is_counted_once_and_a_reused_request_id_is_not() -> None:
    # A file or stdout sink may get a batch again after a failed write: the same lines. A caller
    # may send its own request id, the same on every request: those are different events.
    report = usage_report.Report(("key",))
    lines = jsonl(EVENTS).splitlines(keepends=True)
    for line in [*lines, *lines[:3], *lines[5:]]:
        assert report.add(json.loads(line), line)
    assert (report.total().requests, report.repeats.count) == (len(EVENTS), 6)
    same_id = [dict(e, request_id="mine") for e in EVENTS[:2]]
    for e in same_id:
        line = json.dumps(e).encode() + b"\n"
        assert report.add(json.loads(line), line)
    assert report.total().requests == len(EVENTS) + 2


def test_repeats_are_looked_for_in_a_window_of_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usage_report.Repeats, "WINDOW", 3)
    repeats = usage_report.Repeats()
    assert [repeats.again(line) for line in (b"a", b"b", b"a\n", b"c", b"d", b"a")] == [
        False, False, True, False, False, False]  # "a" left the window of three before its last


def test_cli_counts_a_last_line_without_newline_that_is_whole(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    path.write_bytes(jsonl(EVENTS).rstrip(b"\n"))
    done = aisix_usage(str(path), "--format", "json")
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout)["total"]["requests"] == 8


def test_cli_skips_an_overlong_line_without_holding_it(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    path.write_bytes(jsonl(EVENTS[:1]) + b'{"ts": "' + b"x" * (3 << 20) + b'"}\n' + jsonl(EVENTS[1:]))
    done = subprocess.run([sys.executable, "-c", "import resource, sys; from aisix.__main__ import main; "
                           "rc = main(sys.argv[1:]); "
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)",
                           "usage", str(path), "--format", "json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    *notes, peak_kib = done.stderr.splitlines()
    assert notes == [f"aisix usage: skipped 1 malformed line(s), not usage events (the first at {path}:2)"]
    assert json.loads(done.stdout)["total"]["requests"] == 8
    # the 3 MiB line is read 1 MiB at a time: the interpreter and its imports are ~40 MiB
    baseline = subprocess.run([sys.executable, "-c", "import resource, orjson, aisix.__main__; "
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                              capture_output=True, text=True, cwd=ROOT, timeout=60, check=True)
    assert int(peak_kib) - int(baseline.stdout) < 3 * 1024


@pytest.mark.parametrize(("args", "message"), [
    (["/nonexistent/usage.jsonl"], "aisix usage: cannot read /nonexistent/usage.jsonl: No such file or directory"),
    (["x", "--by", "region"], "argument --by: --by wants one or two of key, model, day"),
    (["x", "--since", "last week"], "argument --since: --since wants a date"),
    (["x", "--format", "xml"], "argument --format: invalid choice"),
])
def test_cli_refusals(args: list[str], message: str) -> None:
    done = aisix_usage(*args)
    assert done.returncode in (1, 2) and done.stdout == ""
    assert message in done.stderr


def test_cli_on_a_corrupt_gzip_says_so(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl(EVENTS))[:-12] + b"garbage!")
    done = aisix_usage(str(path))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"aisix usage: cannot read {path}")


# -- events a real gateway wrote -------------------------------------------------------------

PRICED = [
    {"display_name": "tts-priced", "provider_key": "fake", "model_name": "tts-1", "routes": ["speech"],
     "pricing": {"per_1m_input_characters": 15.0}},
    {"display_name": "whisper-priced", "provider_key": "fake", "model_name": "whisper-1",
     "routes": ["transcriptions", "translations"], "pricing": {"per_request": 0.01}},
]


async def test_totals_of_a_real_gateway_s_events(make_gateway: Any) -> None:
    gw: Gateway = make_gateway(models=PRICED)
    sent = 0
    async with aiohttp.ClientSession() as s:
        for model, key, text in [("tts-priced", TEAM_A, "Hello from AISIX."), ("tts-priced", TEAM_A, "Two."),
                                 ("tts-prod", TEAM_A, "unpriced"), ("tts-priced", "sk-restricted-secret", "no"),
                                 ("tts-priced", "sk-nobody", "no")]:
            async with s.post(gw.url + "/v1/audio/speech", json={"model": model, "input": text, "voice": "a"},
                              headers={"Authorization": f"Bearer {key}"}) as r:
                await r.read()
                sent += 1
        for route in ("transcriptions", "translations"):
            form = aiohttp.FormData()
            form.add_field("model", "whisper-priced")
            form.add_field("file", b"RIFF" + bytes(2000), filename="a.wav", content_type="audio/wav")
            async with s.post(f"{gw.url}/v1/audio/{route}", data=form,
                              headers={"Authorization": f"Bearer {TEAM_A}"}) as r:
                await r.read()
                sent += 1
    events = gw.events(sent)
    assert len(events) == sent
    done = aisix_usage(str(gw.usage_file), "--by", "key,model", "--format", "json")
    assert (done.returncode, done.stderr) == (0, "")
    doc = json.loads(done.stdout)
    groups = {(g["key"], g["model"]): g for g in doc["groups"]}
    assert set(groups) == {("team-a", "tts-priced"), ("team-a", "tts-prod"), ("team-a", "whisper-priced"),
                           ("restricted", "tts-priced"), ("(none)", "(none)")}  # no key: no alias read
    speech = groups[("team-a", "tts-priced")]
    assert (speech["requests"], speech["errors"], speech["characters"]) == (2, 0, len("Hello from AISIX.Two."))
    assert speech["cost_usd"] == pytest.approx(21 * 15.0 / 1e6)
    assert groups[("team-a", "whisper-priced")]["cost_usd"] == pytest.approx(0.02)
    assert groups[("team-a", "tts-prod")]["cost_usd"] is None
    assert groups[("restricted", "tts-priced")]["errors"] == groups[("(none)", "(none)")]["errors"] == 1
    total = doc["total"]
    assert total["requests"] == sent and total["errors"] == sum(e["status"] >= 400 for e in events) == 2
    assert total["cost_usd"] == pytest.approx(sum(e.get("cost_usd", 0) for e in events))
    assert total["unpriced"] == 1  # tts-prod has no price
    assert total["characters"] == sum(e.get("input_characters", 0) for e in events)
    assert total["input_tokens"] == sum(e.get("input_tokens", 0) for e in events)
    assert total["output_tokens"] == sum(e.get("output_tokens", 0) for e in events)
    assert total["audio_min_out"] == pytest.approx(sum(e.get("audio_seconds_out", 0) for e in events) / 60, abs=1e-4)
    table = aisix_usage(str(gw.usage_file), "--by", "model").stdout
    assert table.splitlines()[-1].split()[:3] == ["TOTAL", str(sent), "2"]


def test_csv_keeps_a_callers_alias_from_running_as_a_formula() -> None:
    report = Report(parse_by("model"))
    for model in ("=HYPERLINK(\"http://evil\",\"x\")", "+1", "-2+3", "@SUM(A1)", "\tx", "whisper-1"):
        report.add(ev(model=model))
    rows = list(csv.reader(io.StringIO(usage_report.as_csv(report))))
    assert {r[0] for r in rows[1:]} == {"'=HYPERLINK(\"http://evil\",\"x\")", "'+1", "'-2+3", "'@SUM(A1)", "'\tx",
                                        "whisper-1"}


def test_a_table_shows_control_characters_escaped() -> None:
    """The alias is the caller's string: an escape sequence or a line break in it must not reach
    the operator's terminal (or split a row); CSV and JSON carry it as it was."""
    report = Report(parse_by("model"))
    for model in ("\x1b[2J\x1b[31mFAKE-ROW  999\x1b[0m", "whisper\r\nTOTAL 1", "caf\u00e9", "csi\x9b2J"):
        report.add(ev(model=model))
    table = usage_report.as_table(report)
    assert all(c.isprintable() for line in table.splitlines() for c in line)
    assert len(table.splitlines()) == 2 + 4 + 2  # a header and a rule, one line per model, a rule and the total
    assert "\\u001b[2J\\u001b[31mFAKE-ROW  999" in table and "whisper\\r\\nTOTAL 1" in table
    assert "café" in table and "csi\\u009b2J" in table
    rows = list(csv.reader(io.StringIO(usage_report.as_csv(report))))
    assert {r[0] for r in rows[1:]} == {"\x1b[2J\x1b[31mFAKE-ROW  999\x1b[0m", "whisper\r\nTOTAL 1", "caf\u00e9",
                                        "csi\x9b2J"}
