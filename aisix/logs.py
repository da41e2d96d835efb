"""The process's logging: one line format on stderr, and no caller bytes from aiohttp's own logs.

Our modules log names, counts and the request id, never a key, a prompt or audio. aiohttp logs a
request its HTTP parser refused with the offending line and a traceback, at ERROR: that line can
be an ``Authorization`` header, and a flood of malformed requests would flood the log. The filter
keeps the fact and the kind of error, at INFO, and drops the bytes.

Whatever a library logs, a caller's key is cut out of the line (its traceback included) before it is written: a realtime
handshake's subprotocols carry a browser's key (``openai-insecure-api-key.<key>``), and aiohttp's
WebSocket handshake warns with the whole list when none of them is one it serves.
"""

from __future__ import annotations

import atexit
import logging
import re
import sys

from aiohttp.http_exceptions import HttpProcessingError

from .background import STDERR

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _RefusedRequestFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if isinstance(record.exc_info, tuple) else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "refused a malformed HTTP request (%s)", (type(exc).__name__,)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


# A key in the two forms a caller sends one: a browser's realtime subprotocol and a Bearer token.
# A caller's key is any string without a space (auth.lookup): quotes, commas, ';', ')' and ']'
# included, so where it ends depends on what holds it. Right after a quote (a repr, as aiohttp's
# WebSocket warning writes the subprotocols): at that quote unescaped. A subprotocol outside
# quotes (a header's list): at a comma. A Bearer token outside quotes: at a space.
_KEYS = re.compile(r"""(?<=')(openai-insecure-api-key\.|bearer\s+)(?:\\.|[^'\\\s])+
                     | (?<=")(openai-insecure-api-key\.|bearer\s+)(?:\\.|[^"\\\s])+
                     | (openai-insecure-api-key\.)[^\s,]+
                     | (bearer\s+)\S+""", re.IGNORECASE | re.VERBOSE)


def _cut(m: re.Match[str]) -> str:
    return next(marker for marker in m.groups() if marker) + "[redacted]"


def redact(line: str) -> str:
    """The line with every key cut out (what follows the marker, up to where the key ends)."""
    lowered = line.lower()
    if "openai-insecure-api-key." in lowered or "bearer" in lowered:
        return _KEYS.sub(_cut, line)
    return line


class _ToStderr(logging.Handler):
    """Records formatted here, keys cut out of the whole line (a traceback's text included), and
    written by the stderr thread (background.py) with the access log: a stderr nobody reads
    holds no request (past what may wait for it, lines are dropped and counted)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = redact(self.format(record)) + "\n"
        except Exception:  # noqa: BLE001 (logging's own contract: a bad record must not raise)
            self.handleError(record)
            return
        STDERR.offer(line.encode("utf-8", "backslashreplace"))

    def handleError(self, record: logging.LogRecord) -> None:
        """A record that could not be formatted (a library's arguments that do not fit its
        format): said in a line of its own, without them. logging's own handleError printed the
        message and its arguments to stderr as they were, keys and all, past this thread."""
        error = sys.exc_info()[0]
        STDERR.offer(f"ERROR {record.name}: a log record could not be formatted "
                     f"({error.__name__ if error else 'unknown error'})\n".encode("utf-8", "backslashreplace"))


def setup() -> None:
    handler = _ToStderr()
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("aiohttp.server").addFilter(_RefusedRequestFilter())
    atexit.register(STDERR.wait, 2.0)  # the last lines ("aisix stopped") before the thread goes
