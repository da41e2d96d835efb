"""(alias, key, route) -> the Model to call, or the 404 / 403 / 400 that says why not.

[core] No I/O. An alias that does not exist is 404 whatever the key's globs; one that exists but
the key may not use is 403 (before anything else is said about it); one whose ``routes`` leave out
this route is 400 ``model_not_supported``. The globs were matched against the aliases when the
config loaded.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import errors
from .config import ApiKey, Model

_ECHO_LIMIT = 128  # an alias is echoed in the message; a caller's megabyte is not


def resolve(alias: str, key: ApiKey, models: Mapping[str, Model], route: str) -> Model:
    model = models.get(alias)
    if model is None:
        raise errors.model_not_found(printable(alias))
    if alias not in key.allowed:
        raise errors.model_not_allowed(printable(alias))
    if route not in model.routes:
        raise errors.model_not_supported(alias, route)
    return model


def printable(alias: str) -> str:
    return alias if len(alias) <= _ECHO_LIMIT else alias[:_ECHO_LIMIT] + "…"


def recorded(alias: str, models: Mapping[str, Model]) -> str:
    """The alias as the usage event and the access line record it: a configured one whole, any
    other cut as an echo is (a caller's megabyte must not make a megabyte line)."""
    return alias if alias in models else printable(alias)
