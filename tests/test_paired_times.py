"""Paired timing: two calls measured one after the other in turn, so the machine's drift cancels."""

from __future__ import annotations

import pytest

from catdog_core.sessions import paired_times_ms


class FakeMachine:
    """A clock whose calls cost fixed work times a slowdown that changes in bursts."""

    def __init__(self, slowdowns: list[float]) -> None:
        self.now = 0.0
        self.calls: list[str] = []
        self._slowdowns = slowdowns

    def clock(self) -> float:
        return self.now

    def call(self, name: str, seconds: float) -> None:
        # A neighbour's burst: every slowdown lasts for two calls (one pair), then the next.
        slowdown = self._slowdowns[(len(self.calls) // 2) % len(self._slowdowns)]
        self.calls.append(name)
        self.now += seconds * slowdown


def test_the_ratio_survives_a_neighbour_that_slows_some_pairs_fourfold() -> None:
    machine = FakeMachine([1.0, 1.0, 4.0])
    times = paired_times_ms(
        lambda: machine.call("fp32", 0.010),
        lambda: machine.call("int8", 0.004),
        pairs=30,
        warmup=0,
        clock=machine.clock,
    )
    assert times.ratio == pytest.approx(2.5)
    assert times.first_ms == pytest.approx(10.0) and times.second_ms == pytest.approx(
        4.0
    )  # the medians: most pairs were quiet


def test_the_order_within_a_pair_alternates_after_the_warm_up() -> None:
    machine = FakeMachine([1.0])
    paired_times_ms(
        lambda: machine.call("a", 0.001),
        lambda: machine.call("b", 0.001),
        pairs=4,
        warmup=1,
        clock=machine.clock,
    )
    assert machine.calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
