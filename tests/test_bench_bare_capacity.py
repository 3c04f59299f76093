"""The bare-capacity benchmark counts what its sessions finish (the benchmark itself is not a test)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.bare_capacity import images_per_second, main, measure
from catdog_core.sessions import cpu_session, random_batch
from tests.support import tiny_classifier, write_tiny_models


def test_sessions_side_by_side_count_every_image(tmp_path: Path) -> None:
    tiny_classifier(tmp_path / "m.onnx", 32)
    sessions = [cpu_session(tmp_path / "m.onnx", 1) for _ in range(2)]
    rate = images_per_second(sessions, random_batch(1, 32), seconds=0.3)
    assert rate > 10  # a 32-px toy model runs hundreds of times a second; 0 would mean nothing ran


def test_both_layouts_are_measured_and_written(tmp_path: Path) -> None:
    write_tiny_models(tmp_path, heavy_layers=0)
    figures = measure(tmp_path / "fast.onnx", 32, cpus=2, seconds=0.2)
    assert set(figures) == {"2 sessions of 1 thread", "1 session of 2 threads"}
    out = tmp_path / "bare.json"
    assert (
        main(
            [
                "--models-dir",
                str(tmp_path),
                "--models",
                "fast",
                "--seconds",
                "0.1",
                "--rounds",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    written = json.loads(out.read_text())
    assert len(written["fast"]) == 2 and all(rate > 0 for r in written["fast"] for rate in r.values())
