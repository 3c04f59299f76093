"""The benchmarks' own tools. Every benchmark that drives load with wrk says so and stops before
it starts anything when wrk is not installed, instead of a traceback after servers, pods or busy
loops were started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.load import IdleMeter
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


def test_the_idle_meter_reads_the_idle_share_of_every_cpu_between_two_readings(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal, summed over the CPUs
    stat.write_text("cpu  1000 0 200 5000 100 0 0 0 0 0\ncpu0 500 0 100 2500 50 0 0 0 0 0\n")
    meter = IdleMeter(stat)
    stat.write_text("cpu  1170 0 220 5008 102 0 0 0 0 0\ncpu0 585 0 110 2504 51 0 0 0 0 0\n")
    assert meter.percent() == 5.0  # 10 idle or iowait ticks of 200


def test_the_idle_meter_reads_the_time_the_hypervisor_gave_to_others(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice; guest is inside user already
    stat.write_text("cpu  1000 0 200 5000 100 0 0 300 50 0\n")
    meter = IdleMeter(stat)
    stat.write_text("cpu  1150 0 220 5010 100 0 0 320 90 0\n")
    assert meter.steal_percent() == 10.0  # 20 stolen ticks of 200 (the 40 guest ticks not twice)
    assert meter.percent() == 5.0
