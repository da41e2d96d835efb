"""The request's deadline and its scopes: asyncio.timeout's rules, without its lookups.

The gateway-level behaviour (408 for a silent caller, 504 or a failover for a silent upstream)
is in test_faults.py and test_routing.py; these pin the rules those rest on."""

from __future__ import annotations

import asyncio

import pytest

from aisix.deadline import CLIENT, UPSTREAM, Deadline


def deadline() -> Deadline:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    assert task is not None
    return Deadline(loop, task)


async def test_expiry_is_a_timeout_error_naming_who_was_silent() -> None:
    d = deadline()
    with pytest.raises(TimeoutError), d.scope():
        d.wait(0.01, UPSTREAM)
        await asyncio.Event().wait()
    assert d.waiting_on == UPSTREAM
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr] (the cancel it made is undone)


async def test_bytes_that_flow_move_the_deadline() -> None:
    d = deadline()
    with d.scope():
        for _ in range(5):  # 500 ms in all, past the 300 ms allowed, but 100 ms between moves
            d.wait(0.3, CLIENT)
            await asyncio.sleep(0.1)
    d.close()


async def test_the_innermost_scope_takes_the_expiry_and_the_outer_goes_on() -> None:
    d = deadline()
    caught = False
    with d.scope():
        try:
            with d.scope():  # an attempt
                d.wait(0.01, UPSTREAM)
                await asyncio.Event().wait()
        except TimeoutError:
            caught = True
        d.wait(0.05, CLIENT)  # the exchange goes on, with a fresh allowance
        await asyncio.sleep(0.01)
    d.close()
    assert caught


async def test_an_outer_expiry_after_an_inner_scope_ended() -> None:
    d = deadline()
    with pytest.raises(TimeoutError), d.scope():
        with d.scope():
            d.wait(10, UPSTREAM)
        d.wait(0.01, CLIENT)
        await asyncio.Event().wait()
    assert d.waiting_on == CLIENT


async def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    d = deadline()

    async def request() -> None:
        inner = deadline()
        with inner.scope():
            inner.wait(10, CLIENT)
            await asyncio.Event().wait()

    task = asyncio.ensure_future(request())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    d.close()


async def test_a_closed_deadline_never_fires() -> None:
    d = deadline()
    with d.scope():
        d.wait(0.01, UPSTREAM)
        d.close()
        await asyncio.sleep(0.03)
