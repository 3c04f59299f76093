"""The contention benchmark's arithmetic and command line (the benchmark itself is a make target,
not a test)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import bench.contention
from bench.contention import (
    PLAIN,
    SETTLE_S,
    _cell,
    legible_log_range,
    main,
    markdown,
    measured_models,
    median_of_rounds,
    plot,
    plot_versus_plain,
    run_paired_points,
    server_names,
    settle_seconds,
    tail_aim,
    turns,
    versus_plain,
    versus_plain_markdown,
)


def point(concurrency: int, rate: float, p99: float, idle: float = 1.0) -> dict[str, float]:
    return {
        "concurrency": concurrency,
        "answered_per_s": rate,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
        "errors": 0,
        "idle_percent": idle,
        "steal_percent": 0.0,
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


def test_each_round_is_compared_with_the_plain_handlers_same_round() -> None:
    # catdog-serve ahead in rounds 1 and 3, its p99 within 0.8x in round 3 only.
    ours = [(90.0, 150.0), (80.0, 190.0), (100.0, 120.0)]
    plain = [(85.0, 180.0), (88.0, 200.0), (95.0, 160.0)]
    rounds = [
        {"quiet": {"catdog-serve": {"m": [point(8, *a)]}, PLAIN: {"m": [point(8, *b)]}}}
        for a, b in zip(ours, plain, strict=True)
    ]
    (row,) = versus_plain(median_of_rounds(rounds))
    assert (row["condition"], row["server"], row["model"], row["concurrency"]) == (
        "quiet",
        "catdog-serve",
        "m",
        8,
    )
    assert row["throughput_ratios"] == pytest.approx([90 / 85, 80 / 88, 100 / 95])
    assert row["p99_ratios"] == pytest.approx([150 / 180, 190 / 200, 120 / 160])
    assert (row["rounds_ahead"], row["rounds_within_tail_aim"]) == (2, 1)
    table = versus_plain_markdown(median_of_rounds(rounds))
    assert "| quiet | m | catdog-serve | 8 | 1.05x (2 of 3) | 0.83x (1 of 3) |" in table


def test_a_round_where_a_side_answered_nothing_meets_no_aim() -> None:
    rounds = [
        {"quota-1": {"catdog-serve": {"m": [point(32, 0.0, 0.0)]}, PLAIN: {"m": [point(32, 5.0, 900.0)]}}},
        {"quota-1": {"catdog-serve": {"m": [point(32, 6.0, 800.0)]}, PLAIN: {"m": [point(32, 0.0, 0.0)]}}},
    ]
    (row,) = versus_plain(median_of_rounds(rounds))
    assert row["throughput_ratios"][0] == 0.0 and math.isnan(row["throughput_ratios"][1])
    assert all(math.isnan(r) for r in row["p99_ratios"])
    assert (row["rounds_ahead"], row["rounds_within_tail_aim"]) == (0, 0)


def test_without_the_plain_handler_there_is_nothing_to_compare() -> None:
    rounds = [{"quiet": {"catdog-serve": {"m": [point(8, 90.0, 120.0)]}}}]
    assert versus_plain(median_of_rounds(rounds)) == []
    assert versus_plain_markdown(median_of_rounds(rounds)) == ""


def test_paired_turns_alternate_so_that_neither_server_always_follows_the_other() -> None:
    names = ["catdog-serve", PLAIN]
    assert [turns(names, i) for i in range(3)] == [names, names[::-1], names]


def test_a_paired_point_waits_for_the_work_wrk_left_in_flight() -> None:
    low, high = SETTLE_S
    assert settle_seconds(point(32, 16.0, 2000.0)) == pytest.approx(2.0)  # 32 in flight at 16/s
    assert settle_seconds(point(8, 100.0, 100.0)) == low
    assert settle_seconds(point(32, 1.0, 30000.0)) == high
    assert settle_seconds(point(32, 0.0, 0.0)) == high  # nothing answered: the longest wait


def test_paired_servers_are_up_at_once_each_on_its_port_and_in_its_cgroup_taking_turns(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The schedule of a paired sitting, with the servers, wrk and the cgroups replaced by
    recorders: what runs where and in which order is the part that can be got wrong here."""
    started: list[dict[str, Any]] = []
    up: set[int] = set()
    measured: list[tuple[str, int, set[int]]] = []

    @contextlib.contextmanager
    def fake_start(
        spec: dict[str, Any], group: list[str], port: int, quota: Any, log: Path
    ) -> Iterator[None]:
        started.append({"server": spec["name"], "models": group, "port": port, "quota": quota})
        up.add(port)
        yield
        up.discard(port)

    @contextlib.contextmanager
    def fake_confinement(where: str) -> Iterator[object]:
        yield object()  # a distinct group per server

    def fake_point(url: str, body: Path, concurrency: int, seconds: int, content_type: str) -> dict[str, Any]:
        measured.append((url, concurrency, set(up)))
        return point(concurrency, 50.0, 100.0)

    monkeypatch.setattr(bench.contention, "start", fake_start)
    monkeypatch.setattr(bench.contention, "confinement", fake_confinement)
    monkeypatch.setattr(bench.contention, "_point_with_idle", fake_point)
    monkeypatch.setattr(bench.contention, "wrk", lambda *args: {})
    monkeypatch.setattr(bench.contention.time, "sleep", lambda seconds: None)
    spec = {"ready": "/", "path": "/classify?model={model}", "body": tmp_path, "content_type": "image/jpeg"}
    specs = {
        "catdog-serve": {**spec, "name": "catdog-serve"},
        PLAIN: {**spec, "name": PLAIN},
        "LitServe": {**spec, "name": "LitServe", "per_model_env": "M", "path": "/predict"},
    }
    names = list(specs)
    rounds = run_paired_points(specs, names, ["a", "b"], "quota-1", [8, 32], 10, 2, tmp_path)

    # catdog-serve and the plain handler serve both models; LitServe one process per model.
    assert [(s["server"], s["models"]) for s in started] == [
        ("catdog-serve", ["a", "b"]),
        (PLAIN, ["a", "b"]),
        ("LitServe", ["a"]),
        ("LitServe", ["b"]),
    ]
    ports = [s["port"] for s in started]
    assert len(set(ports)) == 4 and len({id(s["quota"]) for s in started}) == 4
    assert all(alive == set(ports) for _, _, alive in measured)  # all up at every point
    assert len(measured) == 2 * 2 * 2 * 3  # rounds x models x concurrencies x servers
    first_turns = [url for url, _, _ in measured[:6]]
    assert first_turns[:3] == [
        f"http://127.0.0.1:{ports[0]}/classify?model=a",
        f"http://127.0.0.1:{ports[1]}/classify?model=a",
        f"http://127.0.0.1:{ports[2]}/predict",
    ]
    assert first_turns[3:] == first_turns[:3][::-1]  # the next point, the other way round
    assert len(rounds) == 2
    assert all(len(rounds[r][name][m]) == 2 for r in range(2) for name in names for m in ("a", "b"))
    assert up == set()  # every server stopped


def test_the_round_by_round_plot_draws_every_round(tmp_path: Path) -> None:
    rounds = [
        {
            where: {"catdog-serve": {"m": [point(8, 90.0 + i, 150.0)]}, PLAIN: {"m": [point(8, 85.0, 180.0)]}}
            for where in ("quiet", "quota-1")
        }
        for i in range(3)
    ]
    plot_versus_plain(versus_plain(median_of_rounds(rounds)), tmp_path / "rounds.png")
    assert (tmp_path / "rounds.png").stat().st_size > 0


def test_a_model_outside_the_default_pair_has_its_rows_and_plot(tmp_path: Path) -> None:
    # --models takes any model of the manifest; mobilenet-160's points were measured and then
    # left out of the table and the plot, which knew only the default two.
    results = {
        "quiet": {
            "catdog-serve": {
                "mobilenet-160": [point(32, 150.0, 260.0)],
                "mobilenet": [point(32, 80.0, 450.0)],
            },
            PLAIN: {"mobilenet-160": [point(32, 140.0, 300.0)], "mobilenet": [point(32, 75.0, 700.0)]},
        }
    }
    assert measured_models(results) == ["mobilenet", "mobilenet-160"]
    table = markdown(results, [32])
    assert "| mobilenet-160 | catdog-serve | 150.0, 130 / 260 |" in table
    assert "| mobilenet-160 | plain FastAPI | 140.0, 150 / 300 |" in table
    plot(results, tmp_path / "three.png")
    assert (tmp_path / "three.png").stat().st_size > 0
