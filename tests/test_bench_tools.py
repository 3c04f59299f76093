"""Every benchmark that drives load with wrk says so and stops before it starts anything when wrk
is not installed, instead of a traceback after servers, pods or busy loops were started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

WRK_BENCHMARKS = [
    "bench",
    "bench.contention",
    "bench.features",
    "bench.overload",
    "bench.soak",
    "bench.pod_smoke",
]


@pytest.mark.parametrize("module", WRK_BENCHMARKS)
def test_a_benchmark_without_wrk_says_what_to_install(module: str, tmp_path: Path) -> None:
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env={**os.environ, "PATH": str(empty_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "apt-get install wrk" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
