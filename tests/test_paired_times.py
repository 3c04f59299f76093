"""Timing helpers: paired calls (the machine's drift cancels) and steady per-batch figures."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from catdog_core.sessions import paired_times_ms, steady_figures


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


class RecordingSession:
    """Enough of an onnxruntime session for steady_figures: one named input, runs recorded."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def get_inputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name="images")]

    def run(self, outputs: None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.shapes.append(feed["images"].shape)
        time.sleep(0.002)  # long enough that p50's rounding to 1 us leaves the ratio exact to 1e-3
        return [np.zeros((len(feed["images"]), 2), np.float32)]


def test_steady_figures_run_the_asked_batch_and_derive_throughput_from_the_median() -> None:
    session = RecordingSession()
    figures = steady_figures(session, size=32, batch=4, repeats=7)  # type: ignore[arg-type]
    assert session.shapes == [(4, 32, 32, 3)] * (3 + 7)  # three warm-up calls, then the timed ones
    assert set(figures) == {"p50_ms", "p99_ms", "images_per_s"}
    assert figures["p99_ms"] >= figures["p50_ms"] > 0
    assert figures["images_per_s"] == pytest.approx(4000 / figures["p50_ms"], rel=1e-3)
