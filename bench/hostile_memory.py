"""`make hostile-memory`: the server's peak memory under the worst uploads its limits admit.

Every model loaded, the Deployment's ConfigMap settings. Worst cases are built at the decode caps
(16-bit grey, RGBA and RGB PNG, 32-bit TIFF: the most pixels CATDOG_MAX_PIXELS and
CATDOG_MAX_DECODE_BYTES allow for each mode), each sent once and as 8 distinct copies at once
(distinct, so the ConfigMap's response cache cannot answer them); then 30 uploads that each send
19 MB of a declared 20 MB and stall; 30 connections that each stream a 64 MiB header; then the
largest Open Inference Protocol JSON request the body
cap admits (12 MP photos, base64), once and 8 at once. The figure that matters is the server's
high-water RSS (VmHWM) against the Deployment's memory limit, which must keep 20 % headroom.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import io
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml
from PIL import Image

from bench.hostile_images import container_floods
from bench.images import write_bench_images
from bench.load import ROOT, server, stop_on_sigterm
from service.imaging import decode_cost_bytes
from service.settings import Settings

PORT = 18431
URL = f"http://127.0.0.1:{PORT}"


OVERLAYS = ("cpu", "openvino")
"""The k8s overlays whose ConfigMap and memory limit a run can take (kubectl kustomize renders them)."""


def rendered_overlay(overlay: str) -> dict[str, dict[str, Any]]:
    """The overlay as kustomize renders it, by kind (kubectl from .venv, whichever venv runs this)."""
    kubectl = ROOT / ".venv" / "bin" / "kubectl"
    command = [str(kubectl), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)]
    rendered = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return {doc["kind"]: doc for doc in yaml.safe_load_all(rendered) if doc}


def deployment_settings(overlay: str = "cpu") -> dict[str, str]:
    """The overlay's ConfigMap: the server runs as the Deployment runs it. The cpu overlay's provider
    is left to `auto` (the machine's), another overlay's is kept; JSON logs off."""
    config = dict(rendered_overlay(overlay)["ConfigMap"]["data"])
    config.pop("CATDOG_LOG_JSON", None)
    if overlay == "cpu":
        config.pop("CATDOG_PROVIDERS", None)
    return config


def deployment_memory_limit_mib(overlay: str = "cpu") -> float:
    """The server container's memory limit in the overlay's Deployment."""
    deployment = rendered_overlay(overlay)["Deployment"]
    limit = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    return float(limit[:-2]) * {"Mi": 1, "Gi": 1024}[limit[-2:]]


def kib_field(pid: int, name: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {name} for pid {pid}")


def side_at_caps(mode: str, fmt: str, settings: Settings) -> int:
    """The largest square image of `mode` that both caps admit."""
    side = int((settings.max_pixels) ** 0.5)
    while decode_cost_bytes(mode, (side, side), fmt) > settings.max_decode_bytes:
        side -= 16
    return side


def worst_cases(settings: Settings) -> dict[str, bytes]:
    cases = {}
    for name, mode, value, fmt, options in [
        ("16-bit grey PNG", "I;16", 40000, "PNG", {}),
        ("RGBA PNG", "RGBA", (200, 120, 40, 128), "PNG", {}),
        ("RGB PNG", "RGB", (200, 120, 40), "PNG", {}),
        ("32-bit grey TIFF", "I", 3_000_000, "TIFF", {"compression": "tiff_deflate"}),
    ]:
        side = side_at_caps(mode, fmt, settings)
        buffer = io.BytesIO()
        Image.new(mode, (side, side), value).save(buffer, fmt, **options)
        cases[f"{name} {side}x{side}"] = buffer.getvalue()
    # Containers that cost far more to parse than their bytes (refused before parsing since
    # 2026-12-05: the JPEG's APP segments alone had taken 700 MiB).
    cases.update(container_floods(settings.max_body_bytes))
    return cases


_PROBE = r"""
import io, sys
from PIL import Image
from service.imaging import DecodeLimits, decode, decode_cost_bytes
mode, fmt, side = sys.argv[1], sys.argv[2], int(sys.argv[3])
value = {"I;16": 40000, "I": 3000000, "L": 100, "P": 3, "1": 1, "LA": (100, 128), "RGB": (1, 2, 3),
         "RGBA": (1, 2, 3, 128), "CMYK": (1, 2, 3, 4)}[mode]
buffer = io.BytesIO()
Image.new(mode, (side, side), value).save(buffer, fmt, **({"transparency": 0} if mode == "P" else {}))
data = buffer.getvalue()
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
base = status("VmRSS")
decode(data, (299, 299), DecodeLimits(max_pixels=10**9, max_bytes=10**12))
print((status("VmHWM") - base) / side**2, decode_cost_bytes(mode, (side, side), fmt) / side**2)
"""
PROBES = [
    ("L", "PNG"),
    ("RGB", "PNG"),
    ("RGBA", "PNG"),
    ("LA", "PNG"),
    ("P", "PNG"),
    ("1", "PNG"),
    ("I;16", "PNG"),
    ("I", "TIFF"),
    ("CMYK", "TIFF"),
    ("RGB", "BMP"),
    ("RGB", "WEBP"),
    ("RGBA", "WEBP"),
    ("P", "GIF"),
]


def bytes_per_pixel_table(side: int = 4000) -> list[dict[str, Any]]:
    """Each mode and format's measured peak bytes per pixel in decode(), against the table the
    decode-cost cap uses (a fresh process each, so one's allocations cannot hide another's)."""
    rows = []
    for mode, fmt in PROBES:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, mode, fmt, str(side)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        measured, table = (float(v) for v in out.stdout.split())
        rows.append({"mode": mode, "format": fmt, "measured": round(measured, 2), "table": table})
        print(
            f"  {mode:5} {fmt:4}: {measured:5.2f} bytes/pixel measured, {table:.0f} in the table"
            f"{'' if measured <= table + 0.1 else '  <-- OVER'}",
            flush=True,
        )
    return rows


def post(blob: bytes, model: str, url: str = URL) -> int:
    response = httpx.post(
        f"{url}/classify",
        params={"model": model},
        content=blob,
        headers={"Content-Type": "application/octet-stream"},
        timeout=300,
    )
    return response.status_code


def protocol_json_body(image: bytes, max_body_bytes: int, max_images: int) -> bytes:
    """The largest v2 JSON request under the body cap: one photo repeated, base64 in JSON, the
    costliest form to hold (body, text and decoded bytes at once while it is parsed)."""
    encoded = base64.b64encode(image).decode()
    n = max(1, min(max_images, (max_body_bytes - 256) // (len(encoded) + 4)))
    tensor = {"name": "image", "shape": [n], "datatype": "BYTES", "data": [encoded] * n}
    return json.dumps({"inputs": [tensor]}).encode()


def post_protocol(body: bytes, model: str, url: str = URL) -> int:
    response = httpx.post(
        f"{url}/v2/models/{model}/infer",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=300,
    )
    return response.status_code


def distinct(blob: bytes, serial: int) -> bytes:
    """The same image with its own tail after the end marker (decoders ignore it): a new sha256, so
    the response cache the ConfigMap turns on cannot answer it, and the server decodes it again."""
    return blob + b"unique-%08d" % serial


def send_worst_cases(
    settings: Settings, model: str, url: str, port: int, record: Callable[[str, list[int | str]], None]
) -> None:
    """Each worst-case image once and as 8 distinct copies at once, 30 stalled uploads, 30 endless
    request heads, then the largest v2 JSON request once and 8 distinct ones at once; `record` notes
    each step's answers."""
    serials = itertools.count()
    for name, blob in worst_cases(settings).items():
        record(f"{name} ({len(blob) / 1e6:.1f} MB), one", [post(distinct(blob, next(serials)), model, url)])
        copies = [distinct(blob, next(serials)) for _ in range(8)]
        with ThreadPoolExecutor(8) as pool:
            record(f"{name}, 8 at once", list(pool.map(lambda b: post(b, model, url), copies)))
    answers = stalled_uploads(30, 19_000_000, settings.max_body_bytes, settings.body_timeout_s + 3, port)
    record("30 uploads stalled at 19 of 20 MB", [a.split(" ")[1] if " " in a else a for a in answers])
    answers = endless_heads(30, 64 << 20, port)
    record("30 heads of 64 MiB (one header), at once", [a.split(" ")[1] if " " in a else a for a in answers])
    n = 4 * settings.max_connections
    answers = held_heads(n, settings.max_head_bytes - 1024, port)
    record(f"{n} connections holding a head of {settings.max_head_bytes // 1024 - 1} KiB", answers)
    photo = write_bench_images(ROOT / "bench" / "results")["large"].read_bytes()
    bodies = [
        protocol_json_body(distinct(photo, next(serials)), settings.max_body_bytes, settings.max_files)
        for _ in range(9)
    ]
    images = json.loads(bodies[0])["inputs"][0]["shape"][0]
    case = f"v2 JSON, {images} 12 MP photos base64 ({len(bodies[0]) / 1e6:.1f} MB)"
    record(f"{case}, one", [post_protocol(bodies[0], model, url)])
    with ThreadPoolExecutor(8) as pool:
        record(f"{case}, 8 at once", list(pool.map(lambda b: post_protocol(b, model, url), bodies[1:])))


def endless_heads(n: int, most: int, port: int = PORT) -> list[str]:
    """n connections that each stream one header value of up to `most` bytes, side by side, until
    the server answers or closes; what each got back (before the head cap, every byte was kept)."""
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(n)]
    for sock in sockets:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Filler: ")
    chunk, sent, open_ = b"a" * 65536, 0, set(range(n))
    while open_ and sent < most:
        for i in list(open_):
            try:
                sockets[i].sendall(chunk)
            except OSError:
                open_.discard(i)  # refused: the answer is read below
        sent += len(chunk)
    answers = []
    for sock in sockets:
        try:
            answers.append(sock.recv(64).split(b"\r\n")[0].decode() or "closed")
        except OSError as exc:
            answers.append(type(exc).__name__)
        sock.close()
    return answers


def held_heads(n: int, head_bytes: int, port: int = PORT) -> list[str]:
    """n connections opened at once, each sending an unfinished head of `head_bytes` (under the cap)
    and holding it; what each has got a second later: "held" (open, nothing answered) or the status
    (503 past the connection cap). Every open connection may hold that much until its head times out."""
    head = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * head_bytes
    sockets = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # refused at once: the answer is read below
            sock.send(head)
        sockets.append(sock)
    time.sleep(1)
    answers = []
    for sock in sockets:
        try:
            first_line = sock.recv(64, socket.MSG_PEEK).split(b"\r\n")[0].decode()
            answers.append(first_line.split(" ")[1] if " " in first_line else "closed")
        except BlockingIOError:
            answers.append("held")
        except OSError as exc:
            answers.append(type(exc).__name__)
    for sock in sockets:
        sock.close()
    return answers


def stalled_uploads(n: int, sent: int, declared: int, hold_s: float, port: int = PORT) -> list[str]:
    """n connections that send `sent` of `declared` body bytes and then stop; what each got back."""
    sockets = []
    chunk = b"\x00" * 65536
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=hold_s + 30)
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: %d\r\n\r\n" % declared
        )
        left = sent
        try:
            while left > 0:
                left -= sock.send(chunk[: min(left, len(chunk))])
        except OSError:
            pass  # refused before its body (admission): the answer is read below
        sockets.append(sock)
    time.sleep(hold_s)
    answers = []
    for sock in sockets:
        try:
            answers.append(sock.recv(64).split(b"\r\n")[0].decode())
        except OSError as exc:
            answers.append(type(exc).__name__)
        sock.close()
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="xception", help="the model the uploads ask for")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hostile_memory.json")
    parser.add_argument(
        "--overlay",
        choices=OVERLAYS,
        default="cpu",
        help="take this k8s overlay's ConfigMap and memory limit (openvino: run from .venv-openvino)",
    )
    args = parser.parse_args(argv)
    stop_on_sigterm()  # a stopped run still stops what it started
    # Extra CATDOG_ variables in the environment reach the server (a setting to try under the limit).
    env = {"CATDOG_MODELS_DIR": str(args.models_dir), **deployment_settings(args.overlay)}
    settings = Settings(**{k.removeprefix("CATDOG_").lower(): v for k, v in env.items()})
    limit = deployment_memory_limit_mib(args.overlay)
    print("peak bytes per pixel while decoding, by mode and format:", flush=True)
    per_pixel = bytes_per_pixel_table()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    command = [sys.executable, "-m", "service", "--port", str(PORT)]
    with server(command, env, f"{URL}/readyz", args.out.with_suffix(".log")) as process:

        def record(case: str, statuses: list[int | str]) -> None:
            rows.append(
                {
                    "case": case,
                    "statuses": sorted({str(s) for s in statuses}),
                    "counts": dict(collections.Counter(str(s) for s in statuses)),
                    "peak_rss_mib": round(kib_field(process.pid, "VmHWM"), 1),
                    "rss_now_mib": round(kib_field(process.pid, "VmRSS"), 1),
                }
            )
            print(
                f"{case:<44} statuses {rows[-1]['statuses']}  peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB",
                flush=True,
            )

        record("idle, every model loaded and warm", [])
        send_worst_cases(settings, args.model, URL, PORT, record)
        threading.Event().wait(0.5)
    peak = max(r["peak_rss_mib"] for r in rows)
    # 0.1 byte a pixel for the allocator's own overhead in the probe (0.03-0.04 measured).
    table_holds = all(r["measured"] <= r["table"] + 0.1 for r in per_pixel)
    verdict = "within" if peak <= 0.8 * limit and table_holds else "OVER"
    summary = {
        "deployment_limit_mib": limit,
        "peak_rss_mib": peak,
        "headroom": round(1 - peak / limit, 3),
        "rows": rows,
        "bytes_per_pixel": per_pixel,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"\npeak RSS {peak:.0f} MiB against the Deployment's {limit:.0f} MiB limit: "
        f"{100 * (1 - peak / limit):.0f} % "
        f"headroom ({verdict} the 20 % the limit keeps); written to {args.out}"
    )
    return 0 if verdict == "within" else 1


if __name__ == "__main__":
    raise SystemExit(main())
