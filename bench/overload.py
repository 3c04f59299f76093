"""`make overload`: open-loop overload at 1x, 2x and 3x the capacity measured in the same run.

The server runs with its default settings and every model loaded. Capacity is the closed-loop
answered (non-error) throughput (wrk, 8 connections) on the model; Locust (its own process,
bench/open_loop_locustfile.py, requests started on a fixed schedule whatever the answers) then
offers 1x, 2x and 3x that rate
for 30 s each. Reported per point: offered and achieved rate,
answered 200, shed 503, any other status, goodput, p50/p99 of admitted and of shed answers, and
whether every 503 carried Retry-After. The aims: at 3x, admitted p99 <= 2 s, shed answered within
100 ms p99, goodput >= 85 % of the 1x capacity, nothing but 200 and 503, no connection errors.

`--condition` runs the server under one of bench.contention's conditions (a core taken by a busy
process, or the server in a cgroup with a CFS quota of 1.5 or 1 CPU, the load generator outside):
a pod under a CPU limit is where admission's predicted waits meet the throttle.

`--capacity MODEL=RPS` fixes a model's capacity instead of measuring it, so that runs compared
with each other (two commits, two settings) are offered the same rates: each run's measured
capacity moves with the machine, and its multiples with it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.contention import CONDITIONS, condition
from bench.images import write_bench_images
from bench.load import ROOT, require_wrk, server, stop_on_sigterm, wrk
from bench.open_loop import Record, run_open_loop

PORT = 18432
URL = f"http://127.0.0.1:{PORT}"
WARMUP_S = 2  # the first seconds of each point are not counted


def offer(model: str, image: Path, rate: float, seconds: int) -> list[Record]:
    records = run_open_loop(URL, model, image, rate, seconds + WARMUP_S)
    start = min(r[0] for r in records) + WARMUP_S
    return [r for r in records if start <= r[0] < start + seconds]


def summarise(records: list[Record], seconds: int, target: float) -> dict[str, Any]:
    statuses = np.array([r[1] for r in records])
    ms = np.array([r[2] for r in records])
    ok, shed = statuses == 200, statuses == 503

    def pct(mask: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(ms[mask], q)), 1) if mask.any() else None

    return {
        "target_rps": round(target, 1),
        "offered_rps": round(len(records) / seconds, 1),
        "answered_200": int(ok.sum()),
        "shed_503": int(shed.sum()),
        "other": {str(s): int((statuses == s).sum()) for s in set(statuses.tolist()) - {200, 503}},
        "goodput_rps": round(float(ok.sum()) / seconds, 1),
        "admitted_p50_ms": pct(ok, 50),
        "admitted_p99_ms": pct(ok, 99),
        "shed_p50_ms": pct(shed, 50),
        "shed_p99_ms": pct(shed, 99),
        "shed_with_retry_after": all(r[3] for r in records if r[1] == 503),
    }


def capacity_pair(pair: str) -> tuple[str, float]:
    """'mobilenet=20' -> ('mobilenet', 20.0); argparse reports a bad pair as a usage error."""
    model, _, rate = pair.partition("=")
    try:
        capacity = float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want MODEL=RPS, got {pair!r}") from None
    if not capacity > 0:
        raise argparse.ArgumentTypeError(f"want a positive rate, got {pair!r}")
    return model, capacity


def plot(results: dict[str, list[dict[str, Any]]], path: Path, condition_name: str = "quiet") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for model, points in results.items():
        x = [p["offered_rps"] / points[0]["capacity_rps"] for p in points]
        axes[0].plot(x, [p["goodput_rps"] / points[0]["capacity_rps"] for p in points], "o-", label=model)
        axes[1].plot(
            x, [p["admitted_p99_ms"] or float("nan") for p in points], "o-", label=f"{model} admitted"
        )
        axes[1].plot(
            x, [p["shed_p99_ms"] or float("nan") for p in points], "x--", label=f"{model} shed (503)"
        )
    axes[0].axhline(0.85, color="grey", ls=":", lw=1)
    axes[0].set(
        xlabel="offered load / measured capacity",
        ylabel="goodput / capacity",
        ylim=(0, 1.2),
        title="goodput under open-loop overload",
    )
    axes[1].axhline(2000, color="grey", ls=":", lw=1)
    axes[1].set(xlabel="offered load / measured capacity", ylabel="p99 ms", yscale="log", title="p99 latency")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"condition: {condition_name}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--models", nargs="+", default=["mobilenet", "xception"])
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--multiples", nargs="+", type=float, default=[1.0, 2.0, 3.0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overload.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "overload.png")
    parser.add_argument("--condition", choices=CONDITIONS, default="quiet")
    parser.add_argument(
        "--server-python",
        type=Path,
        default=Path(sys.executable),
        help="the interpreter that runs the server (another venv's: .venv-openvino/bin/python for "
        "OpenVINO); Locust and wrk stay with this one",
    )
    parser.add_argument(
        "--capacity",
        nargs="+",
        type=capacity_pair,
        default=[],
        metavar="MODEL=RPS",
        help="use this capacity for the model instead of measuring it (runs to be paired)",
    )
    args = parser.parse_args(argv)
    stop_on_sigterm()  # a stopped run still stops what it started
    require_wrk()
    fixed = dict(args.capacity)
    image = write_bench_images(args.out.parent)["small"]
    results: dict[str, list[dict[str, Any]]] = {}
    env = {"CATDOG_MODELS_DIR": str(args.models_dir)}
    command = [str(args.server_python), "-m", "service", "--port", str(PORT)]
    with (
        condition(args.condition) as quota,
        server(quota.wrap(command) if quota else command, env, f"{URL}/readyz", args.out.with_suffix(".log")),
    ):
        print(f"condition: {args.condition}", flush=True)
        for model in args.models:
            if model in fixed:
                capacity = fixed[model]
                print(f"{model}: capacity fixed at {capacity} req/s (--capacity)", flush=True)
            else:
                capacity = wrk(f"{URL}/classify?model={model}", image, 8, 10)["answered_per_s"]
                print(f"{model}: closed-loop capacity {capacity} req/s (wrk, c=8, 10 s)", flush=True)
            results[model] = []
            for multiple in args.multiples:
                time.sleep(2)  # let the queues drain between points
                point = summarise(
                    offer(model, image, capacity * multiple, args.seconds), args.seconds, capacity * multiple
                )
                point.update(
                    model=model,
                    multiple=multiple,
                    capacity_rps=capacity,
                    capacity_fixed=model in fixed,
                    condition=args.condition,
                )
                results[model].append(point)
                print(json.dumps(point), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.plot, args.condition)
    print(f"written to {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
