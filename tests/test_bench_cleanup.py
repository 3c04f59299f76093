"""A benchmark stopped with SIGTERM (a timeout, CI, `kill`) takes down what it started: a busy loop
left spinning would take a core from every later measurement on the machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import ROOT, proc_stat_fields

BENCH = """
import time
from bench.contention import condition
from bench.load import stop_on_sigterm
stop_on_sigterm()
with condition("busy-core"):
    print("busy", flush=True)
    time.sleep(60)
"""


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(proc_stat_fields(stat)[1])  # field 4: the parent's pid
        except OSError:
            continue  # gone meanwhile
        if parent == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = proc_stat_fields(Path(f"/proc/{pid}/stat"))[0]  # field 3: the state
    except OSError:
        return False
    return state != "Z"


def test_sigterm_stops_the_busy_core_it_started() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", BENCH], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as bench:
        assert bench.stdout is not None and bench.stdout.readline().strip() == "busy"
        busy = children_of(bench.pid)
        assert len(busy) == 1
        try:
            bench.send_signal(signal.SIGTERM)
            assert bench.wait(timeout=30) == 128 + signal.SIGTERM
            deadline = time.monotonic() + 10
            while alive(busy[0]) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not alive(busy[0]), "the busy loop outlived the benchmark"
        finally:
            if alive(busy[0]):
                os.kill(busy[0], signal.SIGKILL)
