"""routing.py [core]: the choice of a target and the cooldown clock, with ``now`` and chance given."""

from __future__ import annotations

from itertools import count

from aisix import routing
from aisix.config import Cooldown, Model, ProviderKey, Retry, Target

KEY = ProviderKey("p", "openai", "http://127.0.0.1:1", "sk", "Authorization: Bearer sk")


def model(*targets: tuple[int, int]) -> Model:
    """Targets of (weight, priority), named t0, t1, ..."""
    return Model("m", tuple(Target(KEY, f"t{i}", w, p) for i, (w, p) in enumerate(targets)), None, None,
                 frozenset({"speech"}), Retry(len(targets), 0), Cooldown())


def test_one_target_is_chosen_once() -> None:
    m = model((1, 0))
    assert routing.choose(m, set(), {}, set(), lambda: 0.5) == 0
    assert routing.choose(m, {0}, {}, set(), lambda: 0.5) is None
    assert routing.choose(m, set(), {}, {0}, lambda: 0.5) is None  # its key's limits refused it
    assert routing.choose(m, set(), {0: 99.0}, set(), lambda: 0.5) == 0  # cooling down: still tried


def test_weights_split_the_unit_interval() -> None:
    m = model((3, 0), (1, 0))
    assert [routing.choose(m, set(), {}, set(), lambda r=r: r) for r in (0.0, 0.74, 0.75, 0.99, 1.0)] == [0, 0, 1, 1, 1]


def test_lowest_priority_first_then_the_next() -> None:
    m = model((1, 1), (1, 0), (5, 2))
    assert routing.choose(m, set(), {}, set(), lambda: 0.9) == 1
    assert routing.choose(m, {1}, {}, set(), lambda: 0.9) == 0
    assert routing.choose(m, {0, 1}, {}, set(), lambda: 0.9) == 2
    assert routing.choose(m, {0, 1, 2}, {}, set(), lambda: 0.9) is None


def test_cooling_and_refused_targets_are_skipped() -> None:
    m = model((1, 0), (1, 0), (1, 1))
    assert routing.choose(m, set(), {0: 10.0}, set(), lambda: 0.0) == 1
    assert routing.choose(m, set(), {0: 10.0}, {1}, lambda: 0.0) == 2  # a lower priority before a cooling one
    # every one left cooling down: the one whose cooldown ends first
    assert routing.choose(m, set(), {0: 30.0, 1: 20.0, 2: 25.0}, set(), lambda: 0.0) == 1
    assert routing.choose(m, {1}, {0: 30.0, 1: 20.0, 2: 25.0}, set(), lambda: 0.0) == 2
    assert routing.choose(m, set(), {0: 30.0, 1: 20.0, 2: 25.0}, {1}, lambda: 0.0) == 2


def test_cooldown_needs_failures_within_the_window_and_ends() -> None:
    policy = Cooldown(failures=3, window_s=60, cooldown_s=30)
    c = routing.Cooldowns()
    k = "m|p/t0"
    assert not c.failed(k, policy, 1000.0)
    assert not c.failed(k, policy, 1030.0)
    assert not c.failed(k, policy, 1061.0)  # the first fell out of the window: two within it
    assert c.failed(k, policy, 1062.0)  # three within 60 s: cooling down for 30 s
    assert c.cooling([k, "other"], 1062.0) == {0: 1092.0}
    assert c.cooling([k], 1091.9) == {0: 1092.0}
    assert c.cooling([k], 1092.0) == {}  # ended, and forgotten
    assert not c.failed(k, policy, 1093.0)  # the count starts again after a cooldown


def test_cooldown_memory_is_bounded_by_the_targets() -> None:
    policy = Cooldown(failures=2, window_s=60, cooldown_s=30)
    c = routing.Cooldowns()
    clock = count(0)
    for _ in range(10_000):
        c.failed("m|p/t0", policy, float(next(clock)))
    assert len(c._failures) + len(c._until) <= 1


def test_the_first_choice_and_cooldown_keys_are_derived_from_the_targets() -> None:
    m = Model("m", (Target(KEY, "a", 1, 2, id="p/a"), Target(KEY, "b", 3, 0, id="p/b"),
                    Target(KEY, "c", 1, 0, id="p/c")), None, None, frozenset({"speech"}), Retry(3, 0), Cooldown())
    assert m.cooldown_keys == ("m|p/a", "m|p/b", "m|p/c")
    assert m.first_choice == (1, 2)  # the lowest priority
    # The first attempt with none cooling down picks from that group by weight, as the general path does.
    assert [routing.choose(m, set(), {}, set(), lambda r=r: r) for r in (0.0, 0.74, 0.75, 0.99)] == [1, 1, 2, 2]
    assert routing.choose(m, set(), {1: 99.0}, set(), lambda: 0.0) == 2  # one cooling down: chosen among the rest
    assert m == Model("m", m.targets, None, None, frozenset({"speech"}), Retry(3, 0), Cooldown())
