"""Load-test plumbing shared by `make bench` and `make soak`: a server in its own process
group, and wrk driving it with one file as the request body."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
LUA = Path(__file__).with_name("wrk_post.lua")


def stop_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C: Python's default ends the process at once, skipping the
    `finally` blocks that stop the servers, the busy loop and Locust and remove the cgroups, so a
    benchmark stopped by a timeout left a core spinning for every measurement after it."""

    def unwind(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, unwind)


def require_wrk() -> None:
    """Stop before anything is started when the load generator is missing: a benchmark that found
    out at its first load point left a traceback after servers (or a pod) had started."""
    if shutil.which("wrk") is None:
        raise SystemExit("this benchmark drives load with wrk: apt-get install wrk (or brew install wrk)")


@contextlib.contextmanager
def server(command: list[str], env: dict[str, str], url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        # A session of its own, so stopping it stops its workers too (LitServe forks them).
        process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        else:
            raise TimeoutError(f"{url} never answered 200")
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


class IdleMeter:
    """The share of the machine's CPU time left idle between start and `percent()` (/proc/stat:
    idle and iowait over every CPU), and the share the hypervisor gave to other guests
    (`steal_percent()`). A server that leaves cores idle under load answers less than the CPU
    allows: under MobileNet load two inference workers on two CPUs left 3.8-6.2 % idle, a third
    0.9-1.4 % (README, "Performance under contention"). Steal is what a VM's drift looks like
    from inside: time the guest wanted to run and did not."""

    def __init__(self, stat: Path = Path("/proc/stat")) -> None:
        self._stat = stat
        self._start = self._ticks()

    def _ticks(self) -> tuple[int, int, int]:
        fields = [int(value) for value in self._stat.read_text().splitlines()[0].split()[1:]]
        # user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
        # counted in user, so the total leaves the two guest fields out.
        return sum(fields[:8]), fields[3] + fields[4], fields[7]

    def _share(self, index: int) -> float:
        now = self._ticks()
        elapsed = now[0] - self._start[0]
        return round(100 * (now[index] - self._start[index]) / elapsed, 1) if elapsed else 0.0

    def percent(self) -> float:
        return self._share(1)

    def steal_percent(self) -> float:
        return self._share(2)


def wrk(
    url: str,
    image: Path,
    concurrency: int,
    seconds: int,
    content_type: str = "image/jpeg",
    script: Path = LUA,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "30s", "-s", str(script), url]
    env = {**os.environ, "BENCH_IMAGE": str(image), "BENCH_CONTENT_TYPE": content_type, **(extra_env or {})}
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    summary = json.loads(output.strip().splitlines()[-1])
    seconds_measured = summary["duration_us"] / 1e6
    errors = summary["http_errors"] + summary["connect_errors"] + summary["read_errors"] + summary["timeouts"]
    return {
        "concurrency": concurrency,
        "requests": summary["requests"],
        "requests_per_s": round(summary["requests"] / seconds_measured, 1),
        # wrk counts error statuses (503s among them) as requests; a refusal is not throughput.
        "answered_per_s": round((summary["requests"] - errors) / seconds_measured, 1),
        "p50_ms": summary["p50_us"] / 1000,
        "p99_ms": summary["p99_us"] / 1000,
        "errors": errors,
        # Which kind, so that a run's errors can be read afterwards (a 503 is an http error).
        "error_kinds": {
            key: summary[key]
            for key in ("http_errors", "connect_errors", "read_errors", "timeouts")
            if summary[key]
        },
    }
