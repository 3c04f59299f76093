"""`python -m bench.bare_capacity`: the most images a second bare onnxruntime computes on this
machine, with the server's CPU layout (one session of one intra-op thread per CPU, side by side)
and with one session on every CPU, batch 1. No HTTP, no decoding: the ceiling the servers of
`make bench-contention` share, to read their throughput against (README, "Where this stands":
catdog-serve answered Xception at 92 % of it, and the tail aim asked for 99 %).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from catdog_core.sessions import cpu_session, random_batch
from service.manifest import load_manifest
from service.runtime import cgroup_cpu_quota, default_threads


def images_per_second(sessions: list[ort.InferenceSession], image: np.ndarray, seconds: float) -> float:
    """Each session running `image` over and over in a thread of its own, all at once, for
    `seconds`: images finished a second, all sessions together."""
    name = sessions[0].get_inputs()[0].name
    for session in sessions:  # warm: the first run plans memory and packs weights
        session.run(None, {name: image})
    counts = [0] * len(sessions)
    start = time.perf_counter()
    stop = start + seconds

    def loop(index: int) -> None:
        while time.perf_counter() < stop:
            sessions[index].run(None, {name: image})
            counts[index] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(sessions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - start)


def measure(path: Path, size: int, cpus: int, seconds: float) -> dict[str, float]:
    image = random_batch(1, size)
    one_thread_each = [cpu_session(path, 1) for _ in range(cpus)]
    return {
        f"{cpus} sessions of 1 thread": images_per_second(one_thread_each, image, seconds),
        f"1 session of {cpus} threads": images_per_second([cpu_session(path, cpus)], image, seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--models", nargs="+", default=["mobilenet", "xception"])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    manifest = load_manifest(args.models_dir / "manifest.json")
    cpus = default_threads(cgroup_cpu_quota())  # the CPUs the server would size itself to
    results: dict[str, list[dict[str, float]]] = {}
    for model in args.models:
        entry = manifest.models[model]
        for round_ in range(1, args.rounds + 1):
            figures = measure(args.models_dir / entry.file, entry.input.width, cpus, args.seconds)
            results.setdefault(model, []).append(figures)
            shown = ", ".join(f"{layout} {rate:.2f} img/s" for layout, rate in figures.items())
            print(f"{model}, round {round_}: {shown}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
