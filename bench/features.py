"""`make bench-features`: what the response cache and the live quality watch cost and give.

- Cache: per model, the server with the cache off and on (CATDOG_CACHE_MAX_ENTRIES), wrk at
  concurrency 8 sending the 500x375 JPEG with a repeat rate of 0, 50 and 90 % (the rest carry a
  unique suffix, so a new cache key, bench/wrk_post.lua). Reported: req/s, p50, p99, and the
  hit rate the server counted (catdog_cache_lookups_total).
- Protocol: `mobilenet` at concurrency 8 through /classify (raw JPEG body) and through the v2
  route in its three body forms (raw binary, binary tensor data, JSON with base64).
- Shadow: `mobilenet` with the watch off and at 10 % (CATDOG_SHADOW_RATE=0.1, Xception checking),
  concurrency 1 (the lane is idle between requests, so checks run) and 8. Reported: req/s, p50,
  p99, and the comparisons run and skipped.

One server process at a time, the load generator in its own process; writes JSON, a markdown
table and a plot.
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.images import write_bench_images
from bench.load import ROOT, require_wrk, server, stop_on_sigterm, wrk
from service.inference_protocol import HEADER_LENGTH as HEADER

PORT = 18770
URL = f"http://127.0.0.1:{PORT}"
REPEAT_RATES = (0.0, 0.5, 0.9)


def counters(name: str, label: str) -> dict[str, float]:
    text = httpx.get(f"{URL}/metrics", timeout=10).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                key = sample.labels[label]
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def serve(models_dir: Path, out: Path, tag: str, **settings: str) -> Any:
    # Default settings but two: more requests admitted, and a queue-wait cap that Xception's
    # batches of 8 at concurrency 8 stay under, so the figures are throughput, not shedding.
    env = {
        "CATDOG_MODELS_DIR": str(models_dir),
        "CATDOG_MAX_CONCURRENT_REQUESTS": "64",
        "CATDOG_MAX_QUEUE_WAIT_MS": "5000",
    }
    env |= {f"CATDOG_{k.upper()}": v for k, v in settings.items()}
    command = [str(ROOT / ".venv" / "bin" / "catdog-serve"), "--host", "127.0.0.1", "--port", str(PORT)]
    return server(command, env, f"{URL}/readyz", out / f"server-{tag}.log")


def load(model: str, image: Path, concurrency: int, seconds: int, repeat: float) -> dict[str, Any]:
    return wrk(
        f"{URL}/classify?model={model}",
        image,
        concurrency,
        seconds,
        extra_env={"BENCH_REPEAT_RATE": str(repeat)},
    )


def cache_points(models_dir: Path, image: Path, out: Path, seconds: int) -> list[dict[str, Any]]:
    points = []
    for model in ("mobilenet", "xception"):
        for entries in ("0", "100000"):
            with serve(models_dir, out, f"cache-{model}-{entries}", cache_max_entries=entries):
                load(model, image, 8, 2, 0.0)  # warm-up, not recorded
                for repeat in REPEAT_RATES:
                    before = counters("catdog_cache_lookups_total", "result")
                    point = load(model, image, 8, seconds, repeat)
                    after = counters("catdog_cache_lookups_total", "result")
                    hits = after.get("hit", 0) - before.get("hit", 0)
                    lookups = hits + after.get("miss", 0) - before.get("miss", 0)
                    point |= {
                        "model": model,
                        "cache": entries != "0",
                        "repeat_rate": repeat,
                        "hit_rate": round(hits / lookups, 3) if lookups else None,
                    }
                    print(json.dumps(point), flush=True)
                    points.append(point)
    return points


def shadow_points(models_dir: Path, image: Path, out: Path, seconds: int) -> list[dict[str, Any]]:
    points = []
    for rate in ("0", "0.1"):
        with serve(models_dir, out, f"shadow-{rate}", shadow_rate=rate):
            load("mobilenet", image, 8, 2, 0.0)
            for concurrency in (1, 8):
                before = counters("catdog_shadow_comparisons_total", "outcome")
                point = load("mobilenet", image, concurrency, seconds, 0.0)
                after = counters("catdog_shadow_comparisons_total", "outcome")
                point |= {"model": "mobilenet", "shadow_rate": float(rate)}
                point |= {
                    k: after.get(k, 0) - before.get(k, 0) for k in ("agree", "disagree", "skipped_busy")
                }
                print(json.dumps(point), flush=True)
                points.append(point)
    return points


def protocol_bodies(image: Path, folder: Path) -> dict[str, tuple[str, Path, str, str | None]]:
    """Route, body file, content type and extra header for each way to send the same JPEG."""
    jpeg = image.read_bytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(jpeg) + 4},
                }
            ]
        }
    ).encode()
    as_json = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(jpeg).decode()],
                }
            ]
        }
    ).encode()
    (folder / "v2-binary.bin").write_bytes(header + struct.pack("<I", len(jpeg)) + jpeg)
    (folder / "v2-json.json").write_bytes(as_json)
    v2 = "/v2/models/mobilenet/infer"
    return {
        "/classify, raw JPEG": ("/classify?model=mobilenet", image, "image/jpeg", None),
        "v2, raw binary": (v2, image, "application/octet-stream", f"{HEADER}: 0"),
        "v2, binary tensor data": (
            v2,
            folder / "v2-binary.bin",
            "application/octet-stream",
            f"{HEADER}: {len(header)}",
        ),
        "v2, JSON base64": (v2, folder / "v2-json.json", "application/json", None),
    }


def protocol_points(models_dir: Path, image: Path, out: Path, seconds: int) -> list[dict[str, Any]]:
    points = []
    with serve(models_dir, out, "protocol"):
        for form, (route, body, content_type, header) in protocol_bodies(image, out).items():
            extra = {"BENCH_HEADER": header} if header else {}
            wrk(f"{URL}{route}", body, 8, 2, content_type, extra_env=extra)  # warm-up
            point = wrk(f"{URL}{route}", body, 8, seconds, content_type, extra_env=extra)
            point |= {"form": form}
            print(json.dumps(point), flush=True)
            points.append(point)
    return points


def markdown(
    cache: list[dict[str, Any]], shadow: list[dict[str, Any]], protocol: list[dict[str, Any]]
) -> str:
    lines = [
        "| model | cache | repeated uploads | hit rate (counted) | answered req/s | p50 ms | p99 ms "
        "| errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in cache:
        hit = "-" if p["hit_rate"] is None else f"{100 * p['hit_rate']:.0f} %"
        lines.append(
            f"| {p['model']} | {'on' if p['cache'] else 'off'} | {100 * p['repeat_rate']:.0f} % | {hit} | "
            f"{p['answered_per_s']:.1f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['errors']} |"
        )
    lines += [
        "",
        "| shadow rate | concurrency | answered req/s | p50 ms | p99 ms | checked (agree/disagree) "
        "| skipped, busy |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in shadow:
        lines.append(
            f"| {100 * p['shadow_rate']:.0f} % | {p['concurrency']} | {p['answered_per_s']:.1f} | "
            f"{p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['agree']:.0f}/{p['disagree']:.0f} | "
            f"{p['skipped_busy']:.0f} |"
        )
    lines += [
        "",
        "| mobilenet, concurrency 8 | answered req/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|",
    ]
    for p in protocol:
        lines.append(
            f"| {p['form']} | {p['answered_per_s']:.1f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | "
            f"{p['errors']} |"
        )
    return "\n".join(lines) + "\n"


def plot(cache: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, model in zip(axes, ("mobilenet", "xception"), strict=True):
        for on in (False, True):
            points = [p for p in cache if p["model"] == model and p["cache"] == on]
            ax.plot(
                [100 * p["repeat_rate"] for p in points],
                [p["answered_per_s"] for p in points],
                marker="o",
                label="cache on" if on else "cache off",
            )
        ax.set_title(f"{model}, concurrency 8")
        ax.set_xlabel("repeated uploads (%)")
        ax.set_ylabel("answered req/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument(
        "--parts", default="cache,shadow,protocol", help="comma-separated: cache, shadow, protocol"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "features.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "cache.png")
    args = parser.parse_args(argv)
    stop_on_sigterm()  # a stopped run still stops what it started
    require_wrk()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image = write_bench_images(args.out.parent / "images")["small"]
    # A part not run keeps its figures from the last run's file, if there is one.
    results: dict[str, list[dict[str, Any]]] = json.loads(args.out.read_text()) if args.out.exists() else {}
    runners = {"cache": cache_points, "shadow": shadow_points, "protocol": protocol_points}
    for part in args.parts.split(","):
        results[part] = runners[part](args.models_dir, image, args.out.parent, args.seconds)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    cache, shadow, protocol = (results.get(part, []) for part in ("cache", "shadow", "protocol"))
    table = markdown(cache, shadow, protocol)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    plot(cache, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
