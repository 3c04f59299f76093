"""bench.gpu's arithmetic and table, without a GPU (the measurements themselves need one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.gpu import agreement, markdown, spread


def test_agreement_counts_label_flips_and_the_largest_difference() -> None:
    cpu = np.array([[0.9, 0.1], [0.45, 0.55], [0.2, 0.8]])
    gpu = np.array([[0.89, 0.11], [0.55, 0.45], [0.2, 0.8]])
    result = agreement(cpu, gpu)
    assert result["labels_differing"] == 1
    assert abs(result["max_abs_probability_diff"] - 0.1) < 1e-12
    assert result["photos"] == 3


def test_table_has_a_row_per_model_and_provider() -> None:
    steady = {b: {"p50_ms": 1.0 * int(b), "p99_ms": 2.0, "images_per_s": 100.0} for b in ("1", "8", "32")}
    results = {
        "machine": "m",
        "gpu": "g",
        "cpu_threads": 4,
        "models": {
            "tiny": {
                "cpu": {"steady": steady},
                "cuda": {
                    "steady": steady,
                    "first_run_ms": {"1": 5.0, "2": 4.0, "8": 6.0, "32": 7.0},
                    "shape_switch_ms": [900.0, 1.5, 800.0, 1.0],
                    "vs_cpu": {"max_abs_probability_diff": 1e-4, "labels_differing": 0, "photos": 10},
                },
            }
        },
    }
    rows = [line for line in markdown(results).splitlines() if line.startswith("| tiny")]
    assert rows == [
        "| tiny | cpu | 1.0 | 8.0 | 32.0 | 100.0 | - | - | - | - |",
        "| tiny | cuda | 1.0 | 8.0 | 32.0 | 100.0 | 5.0 / 6.0 / 7.0 | 400.75 | 1.0e-04 | 0 of 10 |",
    ]


def test_photos_are_spread_over_the_folder_not_taken_from_its_start() -> None:
    paths = [Path(f"cat/{i}.jpg") for i in range(10)] + [Path(f"dog/{i}.jpg") for i in range(10)]
    chosen = spread(paths, 4)
    assert len(chosen) == 4 and {p.parent.name for p in chosen} == {"cat", "dog"}
    assert spread(paths, 100) == paths
