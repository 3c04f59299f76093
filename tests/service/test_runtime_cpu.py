"""CPU quota discovery: the quota of the cgroup this process is in, not only the root's."""

from __future__ import annotations

from pathlib import Path

from service.runtime import cgroup_cpu_limit


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


def test_no_quota_anywhere(tmp_path: Path) -> None:
    _v2(tmp_path, "/", "max 100000")
    assert cgroup_cpu_limit(tmp_path, "0::/\n") is None
