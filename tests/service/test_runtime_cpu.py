"""CPU quota discovery: the quota of the cgroup this process is in, not only the root's."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import runtime
from service.runtime import (
    CpuQuota,
    balance_batches,
    cgroup_cpu_quota,
    decode_threads,
    decode_threads_for,
    inference_layout,
)


def cgroup_cpu_limit(root: Path, membership: str) -> float | None:
    quota = cgroup_cpu_quota(root, membership)
    return quota.cpus if quota else None


def _v2(root: Path, group: str, cpu_max: str) -> None:
    (root / group.strip("/")).mkdir(parents=True, exist_ok=True)
    (root / group.strip("/") / "cpu.max").write_text(cpu_max + "\n")


def test_v2_quota_of_the_process_own_cgroup(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    _v2(tmp_path, "/kubepods/pod1", "max 100000")
    _v2(tmp_path, "/kubepods/pod1/server", "150000 100000")
    assert cgroup_cpu_limit(tmp_path, "0::/kubepods/pod1/server\n") == 1.5


def test_v2_the_tightest_quota_on_the_way_up_wins(tmp_path: Path) -> None:
    _v2(tmp_path, "/slice", "100000 100000")
    _v2(tmp_path, "/slice/app", "max 100000")
    assert cgroup_cpu_limit(tmp_path, "0::/slice/app\n") == 1.0


def test_v1_cfs_quota_of_the_process_own_cgroup(tmp_path: Path) -> None:
    group = tmp_path / "cpu" / "bench" / "server"
    group.mkdir(parents=True)
    (group / "cpu.cfs_quota_us").write_text("100000\n")
    (group / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path, "4:cpu,cpuacct:/bench/server\n1:name=systemd:/x\n") == 1.0


def test_the_quota_period_comes_with_the_tightest_quota(tmp_path: Path) -> None:
    _v2(tmp_path, "/slice", "200000 100000")
    _v2(tmp_path, "/slice/app", "75000 50000")
    assert cgroup_cpu_quota(tmp_path, "0::/slice/app\n") == CpuQuota(cpus=1.5, period_s=0.05)
    group = tmp_path / "cpu" / "pod"
    group.mkdir(parents=True)
    (group / "cpu.cfs_quota_us").write_text("20000\n")
    (group / "cpu.cfs_period_us").write_text("20000\n")
    assert cgroup_cpu_quota(tmp_path, "4:cpu,cpuacct:/pod\n") == CpuQuota(cpus=1.0, period_s=0.02)


def test_no_quota_anywhere(tmp_path: Path) -> None:
    _v2(tmp_path, "/", "max 100000")
    assert cgroup_cpu_limit(tmp_path, "0::/\n") is None


CPU = ["CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("cpus", "workers", "threads", "providers", "spare", "layout"),
    [
        (2, 1, None, CPU, 0, (1, 2, 0)),  # one batch at a time on every CPU
        (2, None, None, CPU, 0, (2, 1, 0)),  # one worker of one thread per CPU
        (1, None, None, CPU, 0, (1, 1, 0)),  # a 1-CPU quota
        (4, 2, None, CPU, 0, (2, 2, 0)),  # the CPUs shared among the workers
        (2, None, 2, CPU, 0, (1, 2, 0)),  # threads named alone: the classic one-worker layout
        (2, 3, 1, CPU, 0, (3, 1, 0)),  # both named: as said, even oversubscribed
        (2, None, None, CUDA, 0, (1, 2, 0)),  # the GPU runs one batch at a time
        (2, None, None, CPU, 1, (3, 1, 1)),  # a spare worker beside one per CPU
        (1, None, None, CPU, 1, (2, 1, 1)),  # one CPU, no quota: two workers of one thread
        (2, 2, None, CPU, 1, (2, 1, 0)),  # workers named: no spare
        (2, None, 2, CPU, 1, (1, 2, 0)),  # threads named: the one-worker layout, no spare
        (2, None, None, CUDA, 1, (1, 2, 0)),  # no spare on the GPU
    ],
)
def test_inference_layout(
    monkeypatch: pytest.MonkeyPatch,
    cpus: int,
    workers: int | None,
    threads: int | None,
    providers: list[str],
    spare: int,
    layout: tuple[int, int, int],
) -> None:
    monkeypatch.setattr(runtime, "default_threads", lambda quota: cpus)
    assert inference_layout(workers, threads, providers, quota=None, spare_workers=spare) == layout


@pytest.mark.parametrize("cpus", [1.0, 1.5, 2.0])
def test_no_spare_worker_under_a_cpu_quota(cpus: float) -> None:
    """A quota leaves no idle CPU for a spare worker to fill; there a third measured slower."""
    quota = CpuQuota(cpus, 0.1)
    assert inference_layout(None, None, CPU, quota, spare_workers=1) == (runtime.default_threads(quota), 1, 0)


@pytest.mark.parametrize(
    ("setting", "workers", "cpu_limit", "balanced"),
    [
        (True, 2, None, True),  # no quota: a core per worker
        (True, 2, 2.0, True),
        (True, 2, 1.5, False),  # the two workers cannot run side by side: one takes the queue
        (True, 1, 1.0, True),  # one worker: nothing to share (and nothing changes)
        (False, 2, None, False),  # off unless set
        (False, 2, 1.5, False),
    ],
)
def test_queues_are_shared_when_set_and_the_quota_leaves_a_cpu_per_worker(
    setting: bool, workers: int, cpu_limit: float | None, balanced: bool
) -> None:
    assert balance_batches(setting, workers, cpu_limit) is balanced


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 1), (4, 1), (5, 2), (8, 2), (16, 4), (64, 16)])
def test_one_decode_thread_per_four_cpus_at_least_one(cpus: int, threads: int) -> None:
    assert decode_threads_for(cpus) == threads


def test_decode_threads_follow_the_quota_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "default_threads", lambda quota: 8 if quota is None else 2)
    assert decode_threads(None, None) == 2
    assert decode_threads(None, CpuQuota(1.5, 0.1)) == 1
    assert decode_threads(3, CpuQuota(1.5, 0.1)) == 3  # as set, even above the quota
