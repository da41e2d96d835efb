"""Bearer key -> ApiKey, looked up by its sha256; the key itself is never kept or compared.

[core] No I/O; the caller passes ``now`` (seconds since the epoch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from . import errors
from .config import ApiKey


def lookup(authorization: str | None, keys_by_hash: Mapping[str, ApiKey]) -> ApiKey:
    """The key named by an ``Authorization: Bearer <key>`` header, or a 401."""
    if not authorization:
        raise errors.invalid_api_key("Missing API key: send 'Authorization: Bearer <key>'.")
    scheme, _, secret = authorization.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret or " " in secret:
        raise errors.invalid_api_key("Malformed Authorization header: expected 'Bearer <key>'.")
    key = keys_by_hash.get(hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest())
    if key is None:
        raise errors.invalid_api_key()
    return key


def check_active(key: ApiKey, now: float) -> None:
    """Raise the 401 for a disabled or expired key."""
    if key.disabled:
        raise errors.key_disabled()
    if key.expires_at is not None and now >= key.expires_at.timestamp():
        raise errors.key_expired()
