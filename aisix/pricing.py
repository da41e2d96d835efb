"""What a request cost, in USD, from a model's (or its target's) prices and what was measured.

[core] Pure arithmetic. A price applies to one quantity; when a price is set and its quantity is
unknown (a speech answer never reports tokens, a format whose duration the gateway cannot read),
the cost is unknown (None), never a guess from the quantities that are known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import Model, Pricing, Target


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__
class Quantities:
    input_characters: int | None = None
    audio_seconds_in: float | None = None  # the upstream's figure when it reported one, else measured
    audio_seconds_out: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


def cost(p: Pricing, q: Quantities) -> float | None:
    """USD, rounded to a millionth of a cent; None when a priced quantity is unknown."""
    total = 0.0
    terms = ((p.per_request, 1, 1), (p.per_1m_input_characters, q.input_characters, 1e6),
             (p.per_minute_input_audio, q.audio_seconds_in, 60), (p.per_minute_output_audio, q.audio_seconds_out, 60),
             (p.per_1m_input_tokens, q.input_tokens, 1e6), (p.per_1m_output_tokens, q.output_tokens, 1e6))
    for price, quantity, per in terms:
        if price is None:
            continue
        if quantity is None:
            return None
        total += price * quantity / per
    # A reported figure finite but huge (1e308 seconds) overflows: no cost is known, not +Inf
    # (null in the event, and the cost counter +Inf for good).
    return round(total, 8) if math.isfinite(total) else None


def prices_of(model: Model, target: Target | None) -> Pricing | None:
    """What prices a request: the target that answered it, else its model (targets that differ
    in price say so; the model's are the rest's)."""
    return (target.pricing if target is not None else None) or model.pricing
