"""The contention benchmark's arithmetic and command line (the benchmark itself is a make target,
not a test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.contention import (
    _cell,
    legible_log_range,
    main,
    measured_models,
    median_of_rounds,
    plot,
    server_names,
    tail_aim,
)


def point(concurrency: int, rate: float, p99: float, idle: float = 1.0) -> dict[str, float]:
    return {
        "concurrency": concurrency,
        "answered_per_s": rate,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
        "errors": 0,
        "idle_percent": idle,
    }


def test_each_point_is_the_median_of_its_rounds_and_keeps_them() -> None:
    rounds = [
        {"quiet": {"a": {"m": [point(8, rate, p99, idle)]}}}
        for rate, p99, idle in ((90.0, 120.0, 4.0), (60.0, 300.0, 0.5), (95.0, 110.0, 1.0))
    ]
    merged = median_of_rounds(rounds)["quiet"]["a"]["m"][0]
    assert merged["concurrency"] == 8
    assert (merged["answered_per_s"], merged["p99_ms"], merged["p50_ms"]) == (90.0, 120.0, 60.0)
    assert merged["idle_percent"] == 1.0
    assert [r["answered_per_s"] for r in merged["rounds"]] == [90.0, 60.0, 95.0]


def test_each_round_keeps_the_kinds_of_its_errors() -> None:
    failing = {**point(32, 2.6, 3583.0), "errors": 32, "error_kinds": {"read_errors": 32}}
    rounds = [{"quota-1": {"a": {"m": [run]}}} for run in (point(32, 10.8, 3427.0), failing)]
    merged = median_of_rounds(rounds)["quota-1"]["a"]["m"][0]
    assert [r["error_kinds"] for r in merged["rounds"]] == [{}, {"read_errors": 32}]


def test_a_cell_says_what_wrk_left_out_of_its_percentiles() -> None:
    assert _cell(point(8, 90.0, 120.0)) == "90.0, 60 / 120"
    assert _cell({**point(32, 2.5, 9995.0), "errors": 12}) == "2.5, 4998 / 9995 (12 errors)"
    assert _cell(point(32, 0.0, 0.0)) == "none finished in the run"
    assert _cell({**point(32, 0.0, 0.0), "errors": 40}) == "none answered (40 errors)"
    assert _cell({**point(32, 1.0, 10.0), "errors": 2.5}) == "1.0, 5 / 10 (2.5 errors)"  # median of rounds


def test_an_unknown_server_name_is_a_usage_error_naming_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--conditions", "quiet", "--servers", "plain", "--out", str(tmp_path / "c.json")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "unknown server 'plain'" in error and "'plain FastAPI'" in error
    assert not (tmp_path / "c.json").exists()  # nothing ran


def test_a_variant_runs_whether_or_not_the_servers_chosen_name_it() -> None:
    # Named in --variant but not in --servers, a variant used to be dropped without a word.
    known = ["catdog-serve", "plain FastAPI", "b1"]
    assert server_names(["catdog-serve", "plain FastAPI"], known, ["b1"]) == [
        "catdog-serve",
        "plain FastAPI",
        "b1",
    ]
    assert server_names(["b1", "catdog-serve"], known, ["b1"]) == ["b1", "catdog-serve"]
    assert server_names(None, known, ["b1"]) == known


def test_the_plot_has_rows_only_for_the_models_measured(tmp_path: Path) -> None:
    point = {"concurrency": 8, "answered_per_s": 4.0, "p50_ms": 900.0, "p99_ms": 1100.0}
    results = {"quiet": {"catdog-serve": {"xception": [point]}, "plain FastAPI": {"xception": [point]}}}
    assert measured_models(results) == ["xception"]
    plot(results, tmp_path / "one.png")
    assert (tmp_path / "one.png").stat().st_size > 0


def test_the_tail_aim_is_four_fifths_of_the_plain_handlers_p99() -> None:
    plain = [point(8, 3.5, 2661.0), point(32, 0.0, 0.0)]
    aim = tail_aim(plain)
    assert aim[0] == pytest.approx(0.8 * 2661.0)
    assert aim[1] != aim[1]  # nothing answered: no aim (nan), not an aim of 0 ms


def test_a_log_axis_spans_at_least_a_factor_of_four() -> None:
    # Two p99s 16 % apart filled a whole log axis and looked a world apart (2,288 against 2,661 ms).
    low, high = legible_log_range(2288.0, 2661.0)
    assert high / low == pytest.approx(4.0)
    assert low < 2288.0 and high > 2661.0
    assert legible_log_range(100.0, 10_000.0) == (100.0, 10_000.0)  # wide already: as it is
