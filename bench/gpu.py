"""`make bench-gpu`: each built model on the CUDA execution provider against the CPU of the same
machine, with the session options the service uses.

Per model and provider configuration:
- the run at each batch size in turn on a fresh session (1, 2, 3, 4, 8, 32: each is a new shape);
- steady latency p50/p99 and images/s at batch 1, 8 and 32;
- runs alternating batch 1 and 2 on that warmed session: onnxruntime >= 1.20 plans its CUDA
  convolutions again at every change of input shape, which is why the service keeps a session
  per padded batch size on CUDA (service/registry.py);
- with --photos, agreement with the CPU on real photos: the largest difference of a calibrated
  probability, and how many labels differ.
Writes results.json, results.md and gpu.png to --out. Needs onnxruntime-gpu and a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from catdog_core.machine import machine_description
from catdog_core.probabilities import softmax
from catdog_core.sessions import cpu_session, random_batch, run_batches, session_options, steady_figures
from service.imaging import preprocess
from service.manifest import ModelEntry, load_manifest
from service.runtime import load_cuda_libraries

CUDA = "CUDAExecutionProvider"
# onnxruntime's CUDA options tried beside its defaults (the service's configuration).
CUDA_VARIANTS: dict[str, dict[str, str]] = {
    "cuda": {},
    "cuda heuristic algos": {"cudnn_conv_algo_search": "HEURISTIC"},
    "cuda no tf32": {"use_tf32": "0"},
}
STEADY_BATCHES = (1, 8, 32)
COLD_BATCHES = (1, 2, 3, 4, 8, 32)
SWITCH_BATCHES = (1, 2) * 4


def cuda_session(path: Path, options: dict[str, str]) -> ort.InferenceSession:
    session = ort.InferenceSession(
        str(path), session_options(1), providers=[(CUDA, options), "CPUExecutionProvider"]
    )
    if session.get_providers()[0] != CUDA:
        raise RuntimeError(f"CUDA provider did not initialise for {path}: {session.get_providers()}")
    return session


def runs_ms(session: ort.InferenceSession, entry: ModelEntry, batches: tuple[int, ...]) -> list[float]:
    """Wall time of one run at each of these batch sizes, in this order."""
    result = []
    for batch in batches:
        feed = {entry.input.name: random_batch(batch, entry.input.width)}
        start = time.perf_counter()
        session.run(None, feed)
        result.append(round((time.perf_counter() - start) * 1000, 2))
    return result


def first_runs_ms(session: ort.InferenceSession, entry: ModelEntry) -> dict[str, float]:
    """Wall time of the first run at each batch size, in increasing order (a fresh session)."""
    return {
        str(batch): ms for batch, ms in zip(COLD_BATCHES, runs_ms(session, entry, COLD_BATCHES), strict=True)
    }


def steady(session: ort.InferenceSession, entry: ModelEntry, seconds: float) -> dict[str, Any]:
    return {str(b): steady_figures(session, entry.input.width, b, 20, seconds) for b in STEADY_BATCHES}


def probabilities(session: ort.InferenceSession, entry: ModelEntry, images: np.ndarray) -> np.ndarray:
    return softmax(run_batches(session, images, batch=8), entry.temperature)


def agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    return {
        "max_abs_probability_diff": float(np.abs(reference - other).max()),
        "labels_differing": int((reference.argmax(1) != other.argmax(1)).sum()),
        "photos": len(reference),
    }


def measure_model(
    entry: ModelEntry, path: Path, photos: list[Path], cpu_threads: int, seconds: float
) -> dict[str, Any]:
    images = np.stack([preprocess(p.read_bytes(), (entry.input.width, entry.input.height)) for p in photos])
    cpu = cpu_session(path, cpu_threads)
    result: dict[str, Any] = {"cpu": {"steady": steady(cpu, entry, seconds)}}
    reference = probabilities(cpu, entry, images) if len(images) else None
    for variant, options in CUDA_VARIANTS.items():
        session = cuda_session(path, options)
        row: dict[str, Any] = {"first_run_ms": first_runs_ms(session, entry)}
        row["steady"] = steady(session, entry, seconds)
        # Alternating batch 1 and 2 on a session that has run both already.
        row["shape_switch_ms"] = runs_ms(session, entry, SWITCH_BATCHES)
        if reference is not None:
            row["vs_cpu"] = agreement(reference, probabilities(session, entry, images))
        result[variant] = row
    return result


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Machine: {results['machine']}; GPU: {results['gpu']}.",
        "",
        "| model | provider | batch 1 p50 ms | batch 8 p50 ms | batch 32 p50 ms | images/s at 32 | "
        "new shape at batch 1 / 8 / 32 ms | alternating 1 and 2, median ms | max prob. diff vs CPU | "
        "labels differing |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, rows in results["models"].items():
        for variant, row in rows.items():
            s = row["steady"]
            first = row.get("first_run_ms")
            cold = " / ".join(str(first[b]) for b in ("1", "8", "32")) if first else "-"
            switching = row.get("shape_switch_ms")
            switch = str(round(float(np.median(switching)), 2)) if switching else "-"
            vs = row.get("vs_cpu")
            diff = f"{vs['max_abs_probability_diff']:.1e}" if vs else "-"
            labels = f"{vs['labels_differing']} of {vs['photos']}" if vs else "-"
            lines.append(
                f"| {model} | {variant} | {s['1']['p50_ms']} | {s['8']['p50_ms']} | {s['32']['p50_ms']} | "
                f"{s['32']['images_per_s']} | {cold} | {switch} | {diff} | {labels} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for variant, row in results["models"][model].items():
            rates = [row["steady"][str(b)]["images_per_s"] for b in STEADY_BATCHES]
            ax.plot(STEADY_BATCHES, rates, marker="o", label=variant)
        ax.set(title=model, xlabel="batch size", xscale="log", yscale="log", xticks=list(STEADY_BATCHES))
        ax.set_xticklabels([str(b) for b in STEADY_BATCHES])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("images/s (bare onnxruntime)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{results['gpu']} vs {results['cpu_threads']} CPU threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def spread(paths: list[Path], limit: int) -> list[Path]:
    """At most `limit` of the paths, every k-th: every class folder has its share."""
    return paths[:: max(1, math.ceil(len(paths) / limit))][:limit]


def gpu_name() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--models", nargs="*", help="default: every model in the manifest")
    parser.add_argument("--photos", type=Path, help="a folder of photos (recursive) for the agreement")
    parser.add_argument("--max-photos", type=int, default=400, help="spread evenly over the folder")
    parser.add_argument("--seconds", type=float, default=1.5, help="per steady batch size")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu"))
    args = parser.parse_args(argv)
    load_cuda_libraries()
    if CUDA not in ort.get_available_providers():
        parser.error(f"onnxruntime offers {ort.get_available_providers()}: install onnxruntime-gpu")
    manifest = load_manifest(args.models_dir / "manifest.json")
    photos = spread(sorted(args.photos.rglob("*.jpg")), args.max_photos) if args.photos else []
    threads = len(os.sched_getaffinity(0))
    results: dict[str, Any] = {
        "machine": machine_description(),
        "gpu": gpu_name(),
        "cpu_threads": threads,
        "models": {},
    }
    for name in args.models or list(manifest.models):
        entry = manifest.models[name]
        print(f"{name}: measuring", flush=True)
        results["models"][name] = measure_model(
            entry, args.models_dir / entry.file, photos, threads, args.seconds
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "results.md").write_text(table + "\n")
    plot(results, args.out / "gpu.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
