"""A realtime session's reckoning (aisix/realtime_account.py) where it meets cancellation: the
end of a session cancels the pump that is charging a usage report."""

from __future__ import annotations

import asyncio

from aisix.exchange import Exchange
from aisix.limits import Limiter
from aisix.limits_memory import MemoryStore
from aisix.limits_plan import Limit, Plan
from aisix.realtime_account import Account
from aisix.realtime_frames import ServerReport
from aisix.transcript import Usage
from tests.test_limits import T0, api_key, limits_of, model


class _Charging(MemoryStore):
    """The in-process store, telling when a charge first reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.reached = asyncio.Event()

    async def charge(self, plan: Plan, charges: dict[str, int], now: float) -> list[Limit]:
        self.reached.set()
        return await super().charge(plan, charges, now)


async def test_a_report_whose_pump_is_cancelled_charges_every_window() -> None:
    # account() moves the tally's mark before it charges the key's, the model's and the provider
    # key's windows: each of them must land, not only the one under way when the pump is cancelled.
    store = _Charging()
    lim = Limiter(store)
    key, m = api_key(tpm=1000), model("rt", tpm=1000)
    account = Account(Exchange("realtime", "rid", 0.0, 0.0), lim, lambda: T0 + 1)
    account.slot = await lim.admit_key(key, T0)
    account.model_slot = await lim.admit_model(m, T0)
    pump = asyncio.create_task(account.account(ServerReport(usage=Usage(total_tokens=70))))
    await store.reached.wait()  # the pump is charging the report...
    pump.cancel()  # ...when the session ends
    await asyncio.gather(pump, return_exceptions=True)
    await lim.close()  # waits for the charges that run on
    windows = limits_of(key, m)
    assert store._count(windows["key.tpm"], T0 + 1) == 70
    assert store._count(windows["model.tpm"], T0 + 1) == 70
