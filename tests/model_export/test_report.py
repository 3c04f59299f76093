"""`make report`'s int8 lines: each variant against its fp32 model, and the CPU they ran on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from catdog_core.sessions import PairedTimes
from model_export import report
from model_export.report import int8_speedups, source_table, speed_verdict, table
from service.manifest import write_manifest
from tests.support import write_tiny_models


def test_each_int8_variant_is_timed_against_its_fp32_model_and_the_cpu_is_named(tmp_path: Path) -> None:
    manifest = write_tiny_models(tmp_path, heavy_layers=2)
    # A stand-in int8 variant of "fast" (the same file: what is checked here is the report's shape).
    manifest.models["fast-int8"] = manifest.models["fast"].model_copy(
        update={"name": "fast-int8", "precision": "int8", "derived_from": "fast"}
    )
    lines = int8_speedups(manifest, tmp_path, threads=(2, 1), pairs=6).splitlines()
    assert len(lines) == 3  # one line per thread count, then the CPU
    for line, threads in zip(lines, (2, 1), strict=False):
        assert re.fullmatch(
            r"fast-int8: [\d.]+ ms vs fast [\d.]+ ms at batch 1 -> [\d.]+x "
            r"(faster \(in|the speed: (slower|level)[^(]*\(faster in) \d+ of 6 pairs\) "
            rf"\({threads} threads, 6 alternating pairs, measured now\)",
            line,
        ), line
    assert lines[2].startswith("measured on ") and "logical CPUs, onnxruntime" in lines[2]


def test_a_manifest_without_int8_variants_says_so(tmp_path: Path) -> None:
    assert (
        int8_speedups(write_tiny_models(tmp_path, heavy_layers=2), tmp_path)
        == "no int8 variants in the manifest"
    )


def _times(ratio: float, second_faster_pairs: int, pairs: int = 60) -> PairedTimes:
    return PairedTimes(
        first_ms=10.0,
        second_ms=10.0 / ratio,
        ratio=ratio,
        second_faster_pairs=second_faster_pairs,
        pairs=pairs,
    )


def test_the_verdict_calls_a_ratio_that_prints_as_1_00x_level() -> None:
    assert speed_verdict(_times(1.004, 50)) == "the speed: level with fp32 (faster in 50 of 60 pairs)"
    assert speed_verdict(_times(0.996, 10)) == "the speed: level with fp32 (faster in 10 of 60 pairs)"
    assert speed_verdict(_times(1.006, 50)) == "faster (in 50 of 60 pairs)"
    assert (
        speed_verdict(_times(0.994, 10))
        == "the speed: slower than fp32 on this CPU (faster in 10 of 60 pairs)"
    )


def test_a_split_of_the_pairs_no_sign_test_can_tell_from_chance_is_called_noise() -> None:
    # make report printed "34.07 ms vs mobilenet 36.66 ms at batch 1 -> 0.97x the speed: slower" (2026-12-05):
    # the medians of the times and of the pairs' ratios disagree, as they can when the pairs split evenly.
    assert (
        speed_verdict(_times(0.97, 28))
        == "the speed: level with fp32 within this run's noise (faster in 28 of 60 pairs)"
    )
    assert speed_verdict(_times(1.08, 38)).startswith("the speed: level")  # two-sided p = 0.052 at 38 of 60
    assert speed_verdict(_times(1.08, 39)) == "faster (in 39 of 60 pairs)"
    assert speed_verdict(_times(0.92, 21)).startswith("the speed: slower")


def test_the_source_table_gives_each_ece_beside_its_noise_floor(tmp_path: Path) -> None:
    manifest = write_tiny_models(tmp_path, heavy_layers=2)
    fast = manifest.models["fast"]
    assert fast.test is not None
    kaggle = fast.test.by_source["kaggle"].model_copy(update={"ece": 0.0154, "ece_if_calibrated_p95": 0.0129})
    by_source = {**fast.test.by_source, "kaggle": kaggle}
    test = fast.test.model_copy(update={"by_source": by_source})
    manifest.models["fast"] = fast.model_copy(update={"test": test})
    rows = {line.split()[0]: line for line in source_table(manifest).splitlines()}
    assert re.search(r"\s1\.54 \(1\.29\)", rows["fast"]), rows["fast"]
    assert "(-)" in rows["slow"]  # recorded before the noise floor was: said, not invented
    assert "p95" in source_table(manifest).splitlines()[-1]


def test_the_main_table_gives_the_overall_ece_beside_its_noise_floor(tmp_path: Path) -> None:
    manifest = write_tiny_models(tmp_path, heavy_layers=2)
    fast = manifest.models["fast"]
    assert fast.test is not None
    test = fast.test.model_copy(update={"ece": 0.0070, "ece_if_calibrated_p95": 0.0053})
    manifest.models["fast"] = fast.model_copy(update={"test": test})
    slow = manifest.models["slow"]
    assert slow.test is not None
    manifest.models["slow"] = slow.model_copy(
        update={"test": slow.test.model_copy(update={"ece_if_calibrated_p95": None})}
    )
    lines = table(manifest).splitlines()
    rows = {line.split()[0]: line for line in lines[2:] if line.split()}
    # Right-aligned columns: a value ends where its header does.
    ece_end, p95_end = lines[0].index(" ECE ") + 4, lines[0].index(" p95") + 4
    assert p95_end - ece_end == 8  # the floor right beside the ECE it qualifies
    assert rows["fast"][ece_end - 8 : p95_end].split() == ["0.0070", "0.0053"]
    assert rows["slow"][p95_end - 8 : p95_end].strip() == "-"  # recorded before the floor was
    assert "p95" in lines[-len(manifest.cascades) - 1]  # the footnote says what it is


def test_speedups_only_prints_the_speed_ups_alone_on_the_provider_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """make report's second step (in .venv-openvino): the speed-ups on one provider, no tables."""
    manifest = write_tiny_models(tmp_path, heavy_layers=2)
    manifest.models["fast-int8"] = manifest.models["fast"].model_copy(
        update={"name": "fast-int8", "precision": "int8", "derived_from": "fast"}
    )
    write_manifest(manifest, tmp_path / "manifest.json")
    report.print_report(tmp_path, None, speedups_only=True, provider="cpu")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == ["fast-int8", "fast-int8"]  # 2 and 1 threads
    assert all("OpenVINO" not in line for line in lines) and lines[-1].startswith("measured on ")
