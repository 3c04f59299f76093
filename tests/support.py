"""Test helpers: tiny throwaway ONNX models with a valid manifest, real servers, real photos."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from fastapi import FastAPI
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families

from catdog_core.hashing import sha256_file
from catdog_core.sessions import SESSION_PROFILE
from service.batching import InferenceLane
from service.manifest import (
    CascadeEntry,
    InputSpec,
    Latency,
    Manifest,
    ModelEntry,
    OutputSpec,
    Parity,
    Provenance,
    QualityFigures,
    SourceQuality,
    write_manifest,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "catdog-web"
# Every root of the development dataset: the split the build documents is drawn from all of them.
SHARED_DATA_ROOTS = [ROOT.parent / "shared" / "data" / name for name in ("catdog-web", "catdog-more")]
BUILT_MODELS = ROOT / "models"


def tiny_classifier(path: Path, size: int, heavy_layers: int = 0, seed: int = 0) -> None:
    """uint8 NHWC image -> mean colour -> (optional heavy matmuls) -> 2 logits.

    heavy_layers adds 512x512 matmuls on a 512-wide vector per image, tiled to make inference
    take measurable time, so queueing and draining can be exercised with a tiny file.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Div", ["mean", "scale"], ["x"]),
    ]
    inits = [numpy_helper.from_array(np.array(127.5, np.float32), "scale")]
    current = "x"
    if heavy_layers:
        inits.append(numpy_helper.from_array(rng.normal(size=(3, 512)).astype(np.float32) * 0.5, "up"))
        nodes.append(helper.make_node("MatMul", [current, "up"], ["h0"]))
        nodes.append(helper.make_node("Unsqueeze", ["h0", "axis1"], ["h0u"]))
        nodes.append(helper.make_node("Tile", ["h0u", "reps"], ["t0"]))
        inits += [
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([1, 256, 1], np.int64), "reps"),
        ]
        current = "t0"
        for i in range(heavy_layers):
            w = numpy_helper.from_array((rng.normal(size=(512, 512)) / 23).astype(np.float32), f"w{i}")
            inits.append(w)
            nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
            nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i + 1}"]))
            current = f"t{i + 1}"
        nodes.append(helper.make_node("ReduceMean", [current], ["pooled"], axes=[1], keepdims=0))
        current = "pooled"
    width = 512 if heavy_layers else 3
    # A strong head, so that different colours give clearly different probabilities.
    inits.append(numpy_helper.from_array(rng.normal(size=(width, 2)).astype(np.float32) * 4, "head"))
    nodes.append(helper.make_node("MatMul", [current, "head"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def tiny_entry(name: str, path: Path, size: int, accuracy: float, latency_ms: float) -> ModelEntry:
    # Two sources: "web" 2 points above the overall accuracy, "kaggle" 3 points below it, so the
    # hardest source (what auto's min_accuracy reads) differs from the overall figure.
    by_source = {
        source: SourceQuality(n_images=50, accuracy=accuracy + delta, log_loss=0.1, ece=0.01)
        for source, delta in (("web", 0.02), ("kaggle", -0.03))
    }
    metrics = QualityFigures(
        split="test",
        n_images=100,
        accuracy=accuracy,
        log_loss=0.1,
        ece=0.01,
        ece_uncalibrated=0.02,
        by_source=by_source,
    )
    digest = sha256_file(path)
    return ModelEntry(
        name=name,
        version=digest[:12],
        family="tiny",
        precision="fp32",
        file=path.name,
        sha256=digest,
        labels=["cat", "dog"],
        temperature=1.5,
        input=InputSpec(name="image", height=size, width=size, in_graph_normalisation="mean colour / 127.5"),
        output=OutputSpec(name="logits"),
        test=metrics,
        val=None,
        latency=Latency(
            p50_ms_batch1=latency_ms,
            p50_ms_batch8=latency_ms * 4,
            intra_op_threads=1,
            machine="test",
            session_profile=SESSION_PROFILE,
        ),
        parameters=1000,
        flops=1000,
        parity=Parity(reference="none", n_images=0, max_abs_diff_probability=0, prediction_agreement=1),
        provenance=Provenance(
            source_artifact="tiny",
            source_sha256="0",
            trained_weights_sha256="0",
            dataset_split_sha256="0",
            git_commit="test",
            exporter="onnx.helper",
        ),
    )


def write_tiny_models(folder: Path, heavy_layers: int = 24) -> Manifest:
    folder.mkdir(parents=True, exist_ok=True)
    tiny_classifier(folder / "fast.onnx", 32)
    tiny_classifier(folder / "slow.onnx", 48, heavy_layers=heavy_layers, seed=1)
    manifest = Manifest(
        created="2026-01-01T00:00:00+00:00",
        models={
            "fast": tiny_entry("fast", folder / "fast.onnx", 32, 0.9, 0.1),
            "slow": tiny_entry("slow", folder / "slow.onnx", 48, 0.95, 20.0),
        },
        cascades=[
            CascadeEntry(
                small="fast",
                large="slow",
                threshold=0.9,
                escalation_rate_val=0.1,
                accuracy_val=0.95,
                expected_cost_ratio=0.2,
                compute_budget=0.25,
                rule_threshold=0.8,
            )
        ],
        default_model="fast",
    )
    write_manifest(manifest, folder / "manifest.json")
    return manifest


def proc_stat_fields(stat: Path) -> list[str]:
    """The fields of a /proc/<pid>/stat (or task stat) file after "pid (comm)": the command may
    hold spaces and parentheses, so split after its last ")". Field n of proc(5) is index n - 3."""
    return stat.read_text().rsplit(")", 1)[1].split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def run_server(
    models_dir: Path, tmp_path: Path, wait_ready: bool = True, python: Path | None = None, **settings: str
) -> Iterator[Server]:
    """A real `python -m service` process on a free port, on this interpreter or `python` (another
    venv's); stopped with SIGTERM afterwards."""
    port = free_port()
    env = {
        **os.environ,
        "CATDOG_MODELS_DIR": str(models_dir),
        "CATDOG_INTRA_OP_THREADS": "1",
        **{f"CATDOG_{k.upper()}": v for k, v in settings.items()},
    }
    log_path = tmp_path / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(python or sys.executable), "-m", "service", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_until(server, "/readyz" if wait_ready else "/livez")
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_until(server: Server, path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not answer 200 within {timeout}s:\n{server.log()}")


def metric_value(url: str, name: str, model: str | None = None) -> float:
    """A metric's samples from /metrics, summed over every model or for the one named."""
    text = httpx.get(f"{url}/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and (model is None or s.labels.get("model") == model)
    )


def wait_for_metric(
    url: str, name: str, at_least: float, model: str | None = None, timeout: float = 30
) -> None:
    """Until the metric reaches at_least: a fixed sleep is too short on a slow, busy machine."""
    deadline = time.monotonic() + timeout
    while metric_value(url, name, model) < at_least:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not reach {at_least} within {timeout}s")
        time.sleep(0.02)


def wait_for_in_flight(url: str, count: int, timeout: float = 30) -> None:
    """Until count requests are in flight (and so past admission: the middlewares take a request
    that far in one step); the /metrics read itself is in flight too."""
    wait_for_metric(url, "catdog_in_flight_requests", count + 1, timeout=timeout)


def shared_photos(label: str, count: int) -> list[Path]:
    folder = SHARED_DATA / label
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (the development dataset lives beside the checkout)")
    return sorted(folder.glob("*.jpg"))[:count]


@contextlib.asynccontextmanager
async def in_process_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app's lifespan running in this process and a client for it, once /readyz says 200:
    for what a test must reach inside the app (its state) or cannot see from outside."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            for _ in range(200):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            yield client


async def given_back(lane: InferenceLane, seconds: float = 10.0) -> bool:
    """Whether an inference lane becomes idle within `seconds`: a worker gives itself back just
    after it hands its last batch's answers to the event loop, so answers can come first."""
    deadline = time.monotonic() + seconds
    while not lane.idle and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return lane.idle
