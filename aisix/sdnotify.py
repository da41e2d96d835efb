"""Tell systemd how the service is doing (sd_notify): one datagram to $NOTIFY_SOCKET, or nothing.

Limit: sends, never waits for an answer, and is a no-op outside a Type=notify unit (no
NOTIFY_SOCKET). No libsystemd: the protocol is one "KEY=value\\n..." datagram on a unix socket.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def notify(*states: str, env: Mapping[str, str] | None = None) -> bool:
    """Send states such as "READY=1", "STOPPING=1", "RELOADING=1", "STATUS=..."; True if sent.

    A failure is logged, never raised: the gateway serves whether or not systemd heard it (under
    Type=notify a missing READY=1 shows as a start that times out, which names the cause).
    """
    address = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not address or not states:
        return False
    if address.startswith("@"):  # a socket in the abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):  # e.g. "vsock:...", which a gateway never runs under
        log.warning("sd_notify: unsupported NOTIFY_SOCKET address; not notifying")
        return False
    message = "\n".join(states).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        log.warning("sd_notify: cannot notify systemd: %s", exc)
        return False
    return True
