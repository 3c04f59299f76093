"""`make report`'s int8 lines: each variant against its fp32 model, and the CPU they ran on."""

from __future__ import annotations

import re
from pathlib import Path

from model_export.report import int8_speedups, source_table, speed_verdict
from tests.support import write_tiny_models


def test_each_int8_variant_is_timed_against_its_fp32_model_and_the_cpu_is_named(tmp_path: Path) -> None:
    manifest = write_tiny_models(tmp_path, heavy_layers=2)
    # A stand-in int8 variant of "fast" (the same file: what is checked here is the report's shape).
    manifest.models["fast-int8"] = manifest.models["fast"].model_copy(
        update={"name": "fast-int8", "precision": "int8", "derived_from": "fast"}
    )
    lines = int8_speedups(manifest, tmp_path, threads=1, pairs=6).splitlines()
    assert len(lines) == 2
    assert re.fullmatch(
        r"fast-int8: [\d.]+ ms vs fast [\d.]+ ms at batch 1 -> [\d.]+x "
        r"(faster|the speed: slower than fp32 on this CPU|the speed: level with fp32 on this CPU) "
        r"\(1 threads, 6 alternating pairs, measured now\)",
        lines[0],
    ), lines[0]
    assert lines[1].startswith("measured on ") and "logical CPUs, onnxruntime" in lines[1]


def test_a_manifest_without_int8_variants_says_so(tmp_path: Path) -> None:
    assert (
        int8_speedups(write_tiny_models(tmp_path, heavy_layers=2), tmp_path)
        == "no int8 variants in the manifest"
    )


def test_the_verdict_calls_a_ratio_that_prints_as_1_00x_level() -> None:
    assert speed_verdict(1.004) == speed_verdict(0.996) == "the speed: level with fp32 on this CPU"
    assert speed_verdict(1.006) == "faster"
    assert speed_verdict(0.994) == "the speed: slower than fp32 on this CPU"


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
