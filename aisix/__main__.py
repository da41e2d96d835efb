"""The `aisix` command: serve, validate, hash-key (`python -m aisix` is the same program).

Limit: parses arguments, loads and reports on the config, and hands a valid one to aisix.server;
it never starts a server on a config that does not validate.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable

from aisix import __version__, config

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
    return parser


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
    r = loaded.resources
    print(f"ok: {loaded.settings.config_file}: {len(r.provider_keys)} provider keys, "
          f"{len(r.models)} models, {len(r.api_keys)} api keys, {len(r.guardrails)} guardrails")
    return 0


def _serve(args: argparse.Namespace) -> int:
    loaded = _load(args.config)
    if loaded is None:
        return 1
    from aisix.server import serve  # imported late: validate and hash-key need no aiohttp

    return serve(loaded, access_log=args.access_log == "on")


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


if __name__ == "__main__":
    sys.exit(main())
