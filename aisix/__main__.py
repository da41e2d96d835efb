"""The `aisix` command: serve, validate, hash-key, usage (`python -m aisix` is the same program).

Limit: parses arguments, loads and reports on the config, and hands a valid one to aisix.server;
it never starts a server on a config that does not validate. `usage` reads event files and prints
what aisix.usage_report adds up.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import gzip
import signal
import sys
import zlib
from collections.abc import Callable, Iterator
from typing import IO, cast

from aisix import __version__, config, usage_report

DEFAULT_CONFIG = "/etc/aisix/config.yaml"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    return command(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aisix", description="An OpenAI-compatible gateway for the audio routes.")
    parser.add_argument("--version", action="version", version=f"aisix {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                         help="config.yaml; its resources_file is read relative to it "
                              f"(default {DEFAULT_CONFIG})")
        return sub

    serve = with_config(commands.add_parser("serve", help="run the gateway"))
    serve.add_argument("--access-log", choices=("on", "off"), default="on",
                       help="log one line per request (default on)")
    serve.set_defaults(command=_serve)
    validate = with_config(commands.add_parser("validate", help="check config.yaml and its resources file"))
    validate.set_defaults(command=_validate)
    hash_key = commands.add_parser(
        "hash-key", help="read a caller key on stdin, print its key_hash",
        description="Reads one key on stdin (one trailing newline is stripped) and prints the "
                    "sha256 hex to put in resources.yaml as key_hash.")
    hash_key.set_defaults(command=_hash_key)
    usage = commands.add_parser(
        "usage", help="sum a usage-event file by key, model or day",
        description="Reads usage events (JSON lines, as the file sink writes them; '-' is stdin, "
                    "a name ending .gz is read through gzip) and prints requests, errors, audio "
                    "minutes, characters, tokens and cost per group (docs/operations.md, "
                    "\"Summing them: aisix usage\"). Malformed lines are skipped and counted on stderr.")
    usage.add_argument("files", nargs="+", metavar="FILE", help="usage.jsonl, rotated copies, or -")
    usage.add_argument("--by", default="key", type=_by, metavar="key|model|day|A,B",
                       help="group by one of key, model, day, or a pair such as key,model "
                            "(default key)")
    usage.add_argument("--since", type=_since, metavar="DATE|TIME",
                       help="only events at or after this UTC date (2026-12-01) or RFC 3339 time")
    usage.add_argument("--format", choices=tuple(usage_report.FORMATS), default="table",
                       help="table for a terminal (default), csv for a spreadsheet, json for a script")
    usage.set_defaults(command=_usage)
    return parser


def _by(text: str) -> tuple[str, ...]:
    try:
        return usage_report.parse_by(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _since(text: str) -> object:
    try:
        return usage_report.parse_since(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _load(path: str) -> config.Config | None:
    """The config, or None after printing every problem on stderr."""
    try:
        return config.load(path)
    except config.ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return None


def _validate(args: argparse.Namespace) -> int:
    loaded = _load(args.config)
    if loaded is None:
        return 1
    problems = _start_problems(loaded)
    if problems:
        for problem in problems:
            print(f"{loaded.settings.config_file}: {problem}", file=sys.stderr)
        return 1
    r = loaded.resources
    print(f"ok: {loaded.settings.config_file}: {len(r.provider_keys)} provider keys, "
          f"{len(r.models)} models, {len(r.api_keys)} api keys, {len(r.guardrails)} guardrails")
    return 0


def _start_problems(loaded: config.Config) -> list[str]:
    """What serve would refuse at start beyond the files themselves: a listen host that does not
    resolve, a file sink's missing directory. Not a port in use: the instance being checked
    before a reload holds its own."""
    import os
    import socket

    settings, problems = loaded.settings, []
    for field, listen in (("proxy.listen", settings.proxy.listen), ("metrics.listen", settings.metrics_listen)):
        if listen is None:
            continue
        try:
            socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (OSError, UnicodeError) as exc:
            problems.append(f"{field}: {listen.host!r} does not resolve ({getattr(exc, 'strerror', None) or exc})")
    sink = settings.usage_sink
    if sink.kind == "file":
        folder = os.path.dirname(os.path.abspath(sink.target))  # as the sink opens it
        if not os.path.isdir(folder):
            problems.append(f"usage.sink: directory {folder} does not exist")
    return problems


def _serve(args: argparse.Namespace) -> int:
    # A SIGHUP before the server has its own handler (a reload or logrotate's as it starts) would
    # end the process: it is remembered, and the reload done once the server is up.
    hups: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, _: hups.append(signum))
    loaded = _load(args.config)
    if loaded is None:
        return 1
    from aisix.server import serve  # imported late: validate and hash-key need no aiohttp

    return serve(loaded, access_log=args.access_log == "on", reload_asked=lambda: bool(hups))


def _hash_key(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():  # typed by hand: do not echo the key to the terminal
        key = getpass.getpass("key: ")
    else:
        # Bytes, not text: text mode would turn a "\r" inside the key into "\n".
        data = sys.stdin.buffer.read()
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
        try:
            key = data.decode("utf-8")
        except UnicodeDecodeError:
            print("aisix hash-key: the key on stdin is not UTF-8", file=sys.stderr)
            return 1
    if not key:
        print("aisix hash-key: empty key on stdin; refusing to hash it", file=sys.stderr)
        return 1
    print(config.hash_key(key))
    return 0


# A usage event is a few hundred bytes: a "line" longer than this is not one, and is skipped
# without being held whole (a file that lost its newlines must not be read into memory).
MAX_LINE = 1 << 20


def _lines(stream: IO[bytes]) -> Iterator[bytes | None]:
    """The file's lines, newline included; None for each overlong line (skipped in pieces)."""
    while line := stream.readline(MAX_LINE):
        if len(line) == MAX_LINE and not line.endswith(b"\n"):
            while (rest := stream.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                pass
            yield None
            continue
        yield line


def _open(name: str) -> IO[bytes]:
    if name == "-":
        return sys.stdin.buffer
    if name.endswith(".gz"):
        return cast(IO[bytes], gzip.open(name, "rb"))  # logrotate's compressed copies
    return open(name, "rb")


def _usage(args: argparse.Namespace) -> int:
    import orjson  # imported late: the other commands do not parse JSON lines

    report = usage_report.Report(args.by, args.since)
    malformed, first_bad, partial = 0, "", 0
    for name in args.files:
        try:
            stream = _open(name)
        except OSError as e:
            print(f"aisix usage: cannot read {name}: {e.strerror or e}", file=sys.stderr)
            return 1
        number = 0
        try:
            with stream if name != "-" else contextlib.nullcontext(stream) as f:  # stdin stays open
                for number, line in enumerate(_lines(f), 1):
                    try:
                        ok = line is not None and report.add(orjson.loads(line), line)
                    except orjson.JSONDecodeError:
                        ok = False
                    if ok:
                        continue
                    if line is not None and not line.endswith(b"\n"):
                        partial += 1  # the last line, cut off: a write in progress, or a crash
                        continue
                    malformed += 1
                    first_bad = first_bad or f"{'stdin' if name == '-' else name}:{number}"
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            print(f"aisix usage: cannot read {name} (after line {number}): {e}", file=sys.stderr)
            return 1
    if partial:
        print(f"aisix usage: skipped an incomplete last line in {partial} file(s) "
              "(an event still being written?)", file=sys.stderr)
    if malformed:
        print(f"aisix usage: skipped {malformed} malformed line(s), not usage events "
              f"(the first at {first_bad})", file=sys.stderr)
    if report.repeats.count:
        print(f"aisix usage: counted {report.repeats.count} event(s) written twice once (the same line again: "
              "a batch a sink wrote again after a failed write)", file=sys.stderr)
    sys.stdout.write(usage_report.FORMATS[args.format](report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
