"""pricing.py [core]: each price on its quantity, unknown quantities, rounding."""

from __future__ import annotations

import pytest

from aisix.config import Pricing
from aisix.pricing import Quantities, cost


@pytest.mark.parametrize("prices, quantities, expected", [
    (Pricing(per_1m_input_characters=15.0), Quantities(input_characters=1000), 0.015),  # tts-1
    (Pricing(per_minute_input_audio=0.006), Quantities(audio_seconds_in=90.0), 0.009),  # whisper-1
    (Pricing(per_minute_output_audio=0.015), Quantities(audio_seconds_out=30.0), 0.0075),
    (Pricing(per_1m_input_tokens=2.5, per_1m_output_tokens=10.0),
     Quantities(input_tokens=1000, output_tokens=200), 0.0045),  # gpt-4o-transcribe
    (Pricing(per_request=0.001, per_minute_input_audio=0.006), Quantities(audio_seconds_in=60.0), 0.007),
    (Pricing(), Quantities(input_characters=5), 0.0),  # priced at nothing
    (Pricing(per_1m_input_tokens=0.6, per_1m_output_tokens=12.0), Quantities(input_characters=100), None),
    (Pricing(per_minute_input_audio=0.006), Quantities(), None),  # a format the gateway cannot read
])
def test_cost(prices: Pricing, quantities: Quantities, expected: float | None) -> None:
    got = cost(prices, quantities)
    assert got == (None if expected is None else pytest.approx(expected, abs=1e-12))


def test_cost_is_rounded_to_a_millionth_of_a_cent() -> None:
    assert cost(Pricing(per_1m_input_characters=15.0), Quantities(input_characters=1)) == 0.000015
    assert cost(Pricing(per_minute_input_audio=0.006), Quantities(audio_seconds_in=1 / 3)) == 0.00003333
