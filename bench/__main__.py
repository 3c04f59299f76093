"""`make bench`: bare onnxruntime vs end-to-end HTTP, per model, with wrk as the load generator.

Measures, on this machine:
- bare onnxruntime latency (p50/p99) and throughput at batch 1 and 8, same thread count as the server;
- preprocessing (decode + resize) of a ~500x375 and a 4000x3000 JPEG;
- end-to-end HTTP latency (p50/p99) and throughput at several client concurrencies, for catdog-serve
  and for a hand-written FastAPI handler (sync, no batching) on the same ONNX files;
and writes results.json, results.md and latency_vs_throughput.png to --out.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.images import write_bench_images
from bench.load import require_wrk, server, stop_on_sigterm, wrk
from catdog_core.machine import machine_description
from catdog_core.sessions import cpu_session, steady_figures
from service.imaging import preprocess
from service.manifest import load_manifest


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(float(np.percentile(samples_ms, 50)), 3),
        "p99_ms": round(float(np.percentile(samples_ms, 99)), 3),
    }


def bare_onnxruntime(path: Path, size: int, threads: int, seconds: float) -> dict[str, Any]:
    session = cpu_session(path, threads)
    return {f"batch{batch}": steady_figures(session, size, batch, 10, seconds) for batch in (1, 8)}


def preprocessing(images: dict[str, Path], sizes: list[int], repeats: int = 30) -> dict[str, Any]:
    result = {}
    for name, path in images.items():
        data = path.read_bytes()
        for size in sizes:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                preprocess(data, (size, size))
                times.append((time.perf_counter() - start) * 1000)
            result[f"{name}->{size}"] = percentiles(times)
    return result


def sweep(
    base_url: str,
    models: list[str],
    image: Path,
    concurrencies: list[int],
    seconds: int,
    path: str = "/classify?model={model}",
    content_type: str = "image/jpeg",
) -> dict[str, list[dict[str, Any]]]:
    results = {}
    for model in models:
        url = base_url + path.format(model=model)
        wrk(url, image, 2, 2, content_type)  # warm the path (and the live latency estimates)
        # Reported as answered (non-error) requests per second: wrk counts 503s as requests, and
        # a refusal is not throughput.
        results[model] = [wrk(url, image, c, seconds, content_type) for c in concurrencies]
        print(
            f"  {model}: "
            + ", ".join(
                f"c={r['concurrency']} {r['answered_per_s']}/s p99 {r['p99_ms']:.1f} ms, {r['errors']} errors"
                for r in results[model]
            ),
            flush=True,
        )
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for system, style in (("catdog-serve", "-o"), ("plain FastAPI", "--s"), ("LitServe", ":^")):
        for model, points in results["http"].get(system, {}).items():
            ax.plot(
                [p["answered_per_s"] for p in points],
                [p["p99_ms"] for p in points],
                style,
                label=f"{system}: {model}",
            )
            for p in points:
                ax.annotate(
                    f"c{p['concurrency']}",
                    (p["answered_per_s"], p["p99_ms"]),
                    fontsize=6,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("throughput (images/s, log)")
    ax.set_ylabel("p99 latency (ms, log)")
    ax.set_title(
        f"p99 latency vs throughput, ~500x375 JPEG, wrk closed loop ({results['machine']})", fontsize=8
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _best(points: list[dict[str, Any]] | None) -> str:
    if not points:
        return " - | - |"
    if any(p["errors"] for p in points):  # a run with failed requests measures nothing useful
        return " errors | - |"
    best = max(points, key=lambda r: r["answered_per_s"])
    return f" {best['answered_per_s']:.0f} (c={best['concurrency']}) | {best['p99_ms']:.0f} |"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Machine: {results['machine']}; server threads {results['threads']}; "
        f"wrk -t1, {results['seconds']} s per point.",
        "",
        "| model | bare b1 p50 ms | bare b8 img/s | e2e c=1 p50 ms | e2e/bare "
        "| best img/s (catdog) | p99 there | best img/s (plain) | p99 there "
        "| best img/s (LitServe) | p99 there |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ours, plain = results["http"]["catdog-serve"], results["http"].get("plain FastAPI", {})
    lit = results["http"].get("LitServe", {})
    for model, bare in results["bare"].items():
        c1 = ours[model][0]
        lines.append(
            f"| {model} | {bare['batch1']['p50_ms']:.1f} | {bare['batch8']['images_per_s']:.0f} | "
            f"{c1['p50_ms']:.1f} | {c1['p50_ms'] / bare['batch1']['p50_ms']:.2f} |"
            + _best(ours[model])
            + _best(plain.get(model))
            + _best(lit.get(model))
        )
    lines += ["", "| preprocessing (decode + resize) | p50 ms | p99 ms |", "|---|---|---|"]
    lines += [f"| {k} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} |" for k, v in results["preprocessing"].items()]
    lines += [
        "",
        "| large JPEG end to end | c | answered img/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for model, points in results["http"].get("catdog-serve 4000x3000", {}).items():
        lines += [
            f"| {model} | {p['concurrency']} | {p['answered_per_s']:.1f} "
            f"| {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['errors']} |"
            for p in points
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=10, help="per load point")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--models", default=None, help="comma-separated (default: all in the manifest)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    stop_on_sigterm()  # a stopped run still stops what it started
    require_wrk()
    manifest = load_manifest(args.models_dir / "manifest.json")
    models = args.models.split(",") if args.models else list(manifest.models)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    images = write_bench_images(args.out / "images")
    results: dict[str, Any] = {
        "machine": machine_description(),
        "threads": args.threads,
        "seconds": args.seconds,
        "bare": {},
        "http": {},
    }
    print("bare onnxruntime", flush=True)
    for name in models:
        e = manifest.models[name]
        results["bare"][name] = bare_onnxruntime(args.models_dir / e.file, e.input.width, args.threads, 3)
        print(f"  {name}: {results['bare'][name]}", flush=True)
    results["preprocessing"] = preprocessing(
        images, sorted({e.input.width for e in manifest.models.values()})
    )
    base = f"http://127.0.0.1:{args.port}"
    env = {
        "CATDOG_MODELS_DIR": str(args.models_dir),
        "CATDOG_INTRA_OP_THREADS": str(args.threads),
        "CATDOG_QUEUE_SIZE": "256",
        # Queue like the baselines do (they admit everything): throughput, not shedding.
        "CATDOG_MAX_QUEUE_WAIT_MS": "60000",
        "CATDOG_LOG_LEVEL": "warning",
    }
    print("catdog-serve", flush=True)
    with server(
        [sys.executable, "-m", "service", "--port", str(args.port)],
        env,
        base + "/readyz",
        args.out / "server.log",
    ):
        results["http"]["catdog-serve"] = sweep(base, models, images["small"], concurrencies, args.seconds)
        large_models = [m for m in ("mobilenet", "xception") if m in models]
        results["http"]["catdog-serve 4000x3000"] = sweep(
            base, large_models, images["large"], concurrencies[:2], args.seconds
        )
    print("plain FastAPI handler", flush=True)
    plain_models = [m for m in ("mobilenet", "xception") if m in models]
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.baselines.plain_fastapi:app",
        "--port",
        str(args.port),
        "--log-level",
        "warning",
    ]
    with server(command, env, base + "/docs", args.out / "plain.log"):
        results["http"]["plain FastAPI"] = sweep(
            base, plain_models, images["small"], concurrencies, args.seconds
        )
    if importlib.util.find_spec("litserve") is not None:
        print("LitServe (batching)", flush=True)
        body = args.out / "images" / "small.json"
        body.write_text(json.dumps({"image": base64.b64encode(images["small"].read_bytes()).decode()}))
        results["http"]["LitServe"] = {}
        for model in plain_models:
            command = [sys.executable, "-m", "bench.baselines.litserve_app", str(args.port)]
            with server(
                command, {**env, "CATDOG_BENCH_MODEL": model}, base + "/health", args.out / "litserve.log"
            ):
                results["http"]["LitServe"].update(
                    sweep(
                        base,
                        [model],
                        body,
                        concurrencies,
                        args.seconds,
                        path="/predict",
                        content_type="application/json",
                    )
                )
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    plot(results, args.out / "latency_vs_throughput.png")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
