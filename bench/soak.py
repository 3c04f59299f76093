"""`make soak`: the server's memory under a long mixed load, sampled from /proc, with a plot.

wrk drives one model at a time for a slice of the run, cycling through every model plus `auto`
and `cascade`, small and 12 MP photos alternating, while the server's resident set size (RSS,
including its threads) is sampled every few seconds. A leak shows up as a rising line; the
aim is a flat line under 1 GiB with every model loaded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.images import write_bench_images
from bench.load import require_wrk, server, stop_on_sigterm, wrk
from service.manifest import load_manifest


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self._stop_event = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self._stop_event.is_set():
            self.samples.append((time.monotonic() - start, rss_mib(self.pid)))
            self._stop_event.wait(self.every_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def plot(samples: list[tuple[float, float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    ax.plot([t / 60 for t, _ in samples], [m for _, m in samples], "-", lw=1.2)
    ax.axhline(1024, color="tab:red", ls="--", lw=1, label="1 GiB")
    ax.set_ylim(0, max(1100, max(m for _, m in samples) * 1.1))
    ax.set_xlabel("minutes under load")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title(title, fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--slice-seconds", type=int, default=20, help="wrk run per model before switching")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    stop_on_sigterm()  # a stopped run still stops what it started
    require_wrk()
    manifest = load_manifest(args.models_dir / "manifest.json")
    args.out.mkdir(parents=True, exist_ok=True)
    images = write_bench_images(args.out / "images")
    targets = [*manifest.models, "auto", "cascade"]
    base = f"http://127.0.0.1:{args.port}"
    env = {"CATDOG_MODELS_DIR": str(args.models_dir), "CATDOG_LOG_LEVEL": "warning"}
    command = [sys.executable, "-m", "service", "--port", str(args.port)]
    with server(command, env, base + "/readyz", args.out / "soak-server.log") as process:
        loaded = rss_mib(process.pid)
        sampler = RssSampler(process.pid, every_s=5)
        sampler.start()
        runs: list[dict[str, Any]] = []
        end = time.monotonic() + args.minutes * 60
        for target, size in zip(itertools.cycle(targets), itertools.cycle(("small", "small", "large"))):
            left = int(end - time.monotonic())
            if left < 2:
                break
            result = wrk(
                f"{base}/classify?model={target}",
                images[size],
                args.concurrency,
                min(args.slice_seconds, left),
            )
            runs.append({"model": target, "image": size, **result})
            print(
                f"  {target:>14} {size:>5}: {result['requests_per_s']:7.1f}/s "
                f"p99 {result['p99_ms']:7.1f} ms, "
                f"errors {result['errors']}, RSS {sampler.samples[-1][1]:.0f} MiB",
                flush=True,
            )
        sampler.stop()
    rss = [m for _, m in sampler.samples]
    tenth = max(1, len(rss) // 10)
    summary = {
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "rss_after_load_mib": round(loaded, 1),
        "rss_max_mib": round(max(rss), 1),
        "rss_first_tenth_mean_mib": round(sum(rss[:tenth]) / tenth, 1),
        "rss_last_tenth_mean_mib": round(sum(rss[-tenth:]) / tenth, 1),
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
    }
    (args.out / "soak.json").write_text(
        json.dumps({"summary": summary, "runs": runs, "rss": sampler.samples}, indent=1)
    )
    plot(
        sampler.samples,
        f"server RSS under {args.minutes:g} min of mixed load (wrk c={args.concurrency}, "
        f"every model, auto, cascade; 500x375 and 12 MP JPEGs)",
        args.out / "soak_rss.png",
    )
    print(json.dumps(summary, indent=2))
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
