"""Run the open-loop arrival schedule (`open_loop_locustfile.py`) in a Locust process of its own.

Used by `make overload` and by the drain test: the generator must not share a process (or a GIL)
with the server or the code judging the answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LOCUSTFILE = Path(__file__).with_name("open_loop_locustfile.py")

Record = tuple[float, int, float, bool]
"""(sent at, unix seconds; HTTP status, 0 for a connection error; latency ms; Retry-After present)."""


def open_loop_command(url: str, seconds: float) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        url,
        "-u",
        "1",
        "-r",
        "1",
        "-t",
        f"{max(1, round(seconds))}s",
        "--only-summary",
        "--stop-timeout",
        "35",
        "--loglevel",
        "WARNING",
    ]


def start_open_loop(
    url: str, model: str, image: Path, rate: float, seconds: float, out: Path, unique: bool = False
) -> subprocess.Popen[bytes]:
    """Start offering `rate` requests a second for `seconds`; the records land in `out` at exit.
    `unique`: every upload differs (a server's response cache cannot answer them)."""
    env = {
        **os.environ,
        "OVERLOAD_IMAGE": str(image),
        "OVERLOAD_MODEL": model,
        "OVERLOAD_RATE": str(rate),
        "OVERLOAD_OUT": str(out),
        "OVERLOAD_UNIQUE": "1" if unique else "0",
    }
    return subprocess.Popen(
        open_loop_command(url, seconds), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def run_open_loop(
    url: str, model: str, image: Path, rate: float, seconds: float, unique: bool = False
) -> list[Record]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        process = start_open_loop(url, model, image, rate, seconds, out, unique)
        try:
            output, _ = process.communicate()
        except BaseException:  # stopped (SIGTERM, Ctrl-C): the load stops with it
            process.kill()
            process.wait()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"locust exited with {process.returncode}:\n{output.decode(errors='replace')}")
        return [
            (float(sent), int(status), float(ms), bool(retry))
            for sent, status, ms, retry in json.loads(out.read_text())
        ]
