"""Which target of an alias an attempt goes to, what counts as a failure, and cooldowns.

[core] No I/O, no clock: ``now`` and a random number are passed in. Where cooldowns are kept (one
process, or Redis for every instance) is limits.py's; this module says what they mean.

- **Choice.** Among the untried targets of the lowest ``priority`` that are neither cooling down
  nor refused by their provider key's limits, one at random in proportion to ``weight``. When
  every untried target is cooling down, the one whose cooldown ends first: the gateway never
  refuses for want of a healthy target.
- **Failover** happens before the caller has any byte of the answer, on a connection failure, no
  answer head within the timeout, or one of ``FAILOVER_STATUSES`` (a key the provider refuses is
  that target's fault, not the caller's).
- **Cooldown.** ``failures`` failures within ``window_s`` keep a target out for ``cooldown_s``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence

from .config import Cooldown, Model

FAILOVER_STATUSES = frozenset({401, 403, 429, 500, 502, 503, 504})
CONNECT, TIMEOUT, RESET = "connect", "timeout", "reset"  # how an attempt failed without an answer


def choose(model: Model, tried: Collection[int], cooling: Mapping[int, float], refused: Collection[int],
           rand: Callable[[], float]) -> int | None:
    """The index of the next target to try, or None when none is left.

    ``cooling``: target index -> when its cooldown ends, for those cooling down; ``refused``:
    targets whose provider key's limits refused this request."""
    targets = model.targets
    if len(targets) == 1:  # the common case: no choice to make
        return None if tried or refused else 0
    if tried or refused or cooling:
        left = [i for i in range(len(targets)) if i not in tried and i not in refused]
        if not left:
            return None
        healthy = [i for i in left if i not in cooling]
        if not healthy:
            return min(left, key=lambda i: (cooling[i], i))
        top = min(targets[i].priority for i in healthy)
        group: Sequence[int] = [i for i in healthy if targets[i].priority == top]
    else:  # a first attempt with every target healthy: the usual case, its group known from the config
        group = model.first_choice
    point = rand() * sum(targets[i].weight for i in group)
    for i in group:
        point -= targets[i].weight
        if point < 0:
            return i
    return group[-1]  # rand() was 1.0 or rounding fell short


class Cooldowns:
    """Failures and cooldowns for one process, bounded by the targets configured (entries end
    with their window)."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}
        self._until: dict[str, float] = {}

    def cooling(self, keys: Sequence[str], now: float) -> dict[int, float]:
        """Index in ``keys`` -> when its cooldown ends, for those cooling down at ``now``."""
        out = {}
        for i, k in enumerate(keys):
            until = self._until.get(k)
            if until is not None:
                if until > now:
                    out[i] = until
                else:
                    del self._until[k]
        return out

    def failed(self, k: str, policy: Cooldown, now: float) -> bool:
        """Record a failure; True when it starts a cooldown."""
        times = self._failures.setdefault(k, deque())
        times.append(now)
        while times and times[0] <= now - policy.window_s:
            times.popleft()
        if len(times) < policy.failures:
            return False
        del self._failures[k]
        self._until[k] = now + policy.cooldown_s
        return True
