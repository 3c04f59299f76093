"""The CUDA execution provider path. The first tests run everywhere; the rest need onnxruntime-gpu
and an NVIDIA GPU, so CI (no GPU) skips them; they were run on a lent H200 (README, "GPU")."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import onnxruntime as ort
import pytest

from service.batching import InferenceLane
from service.manifest import load_manifest
from service.registry import _session_per_padded_size, padded_batch_sizes, warm_batch_sizes
from service.runtime import create_session, resolve_providers
from service.settings import Settings
from tests.service.images import encode, gradient, jpeg
from tests.support import BUILT_MODELS, Server, run_server, shared_photos

CUDA_PRESENT = "CUDAExecutionProvider" in ort.get_available_providers()
needs_gpu = pytest.mark.skipif(not CUDA_PRESENT, reason="needs onnxruntime-gpu and an NVIDIA GPU")


@pytest.fixture
def cuda_offered(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """onnxruntime says it has CUDA; the list records each preload_dlls call and what it printed."""
    calls: list[str] = []

    def preload_dlls() -> None:
        calls.append("preload")
        print("Failed to load libcudnn.so.9: cannot open shared object file")  # noqa: T201 as the real one does

    monkeypatch.setattr(ort, "preload_dlls", preload_dlls, raising=False)
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    return calls


@pytest.mark.parametrize("choice", ["auto", "cuda"])
def test_cuda_libraries_are_loaded_before_a_cuda_session_and_failures_logged(
    cuda_offered: list[str], choice: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        assert resolve_providers(choice) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert cuda_offered == ["preload"]
    assert "libcudnn.so.9" in caplog.text  # in the log, not on stdout


def test_cpu_choice_loads_no_cuda_libraries(cuda_offered: list[str]) -> None:
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert cuda_offered == []


def test_an_onnxruntime_without_preload_dlls_still_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(ort, "preload_dlls", raising=False)
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert resolve_providers("cuda")[0] == "CUDAExecutionProvider"


def test_cuda_pads_batches_to_few_sizes_and_warms_each_cpu_neither() -> None:
    assert padded_batch_sizes("cuda", 8) == [1, 2, 4, 8]
    assert warm_batch_sizes("cuda", 8) == [1]  # the other sizes: each its own session
    assert padded_batch_sizes("cuda", 12) == [1, 2, 4, 8, 12]
    assert padded_batch_sizes("cuda", 1) == [1]
    assert padded_batch_sizes("cpu", 8) is None
    assert warm_batch_sizes("cpu", 8) == [1, 8]
    assert warm_batch_sizes("cpu", 1) == [1]


def test_each_padded_size_gets_its_own_session_warmed_at_that_size_only(tiny_models_dir: Path) -> None:
    """Run here on CPU sessions (the function is the same on CUDA): a session per size beyond
    batch one's, and with no padding (CPU serving) none."""
    manifest = load_manifest(tiny_models_dir / "manifest.json")
    entry = manifest.models["fast"]
    path = tiny_models_dir / entry.file
    providers = ["CPUExecutionProvider"]
    settings = Settings(models_dir=tiny_models_dir)
    first = create_session(path, providers, 1, settings.intra_op_spinning)
    lane = InferenceLane()
    try:
        sessions = _session_per_padded_size(first, [1, 2, 4], path, entry, providers, 1, settings, lane)
        assert _session_per_padded_size(first, None, path, entry, providers, 1, settings, lane) is None
    finally:
        lane.shutdown()
    assert sessions is not None and sorted(sessions) == [1, 2, 4] and sessions[1] is first
    assert len({id(s) for s in sessions.values()}) == 3


def _answers(
    server: Server, model: str, blobs: list[bytes]
) -> tuple[dict[str, object], list[dict[str, float]]]:
    files = [("file", (f"{i}.jpg", blob, "image/jpeg")) for i, blob in enumerate(blobs)]
    response = httpx.post(f"{server.url}/classify", params={"model": model}, files=files, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    return body, [r["probabilities"] for r in body["results"]]


def _compare_servers(
    models_dir: Path, tmp_path: Path, blobs: list[bytes], tolerance: dict[str, float]
) -> None:
    """The same models and images on a CUDA and a CPU server: every model reports cuda, and its
    calibrated probabilities match the CPU's within its tolerance (same label wherever the CPU is
    not near 50/50)."""
    for folder in ("cuda", "cpu"):
        (tmp_path / folder).mkdir()
    with (
        run_server(models_dir, tmp_path / "cuda", providers="cuda") as on_gpu,
        run_server(models_dir, tmp_path / "cpu", providers="cpu") as on_cpu,
    ):
        listed = httpx.get(f"{on_gpu.url}/models", timeout=10).json()["models"]
        assert {m["name"]: m["device"] for m in listed} == {m["name"]: "cuda" for m in listed}
        for model, allowed in tolerance.items():
            gpu, cpu = [], []
            for start in range(0, len(blobs), 12):  # a request takes at most 16 files
                gpu_body, gpu_answers = _answers(on_gpu, model, blobs[start : start + 12])
                assert gpu_body["device"] == "cuda"
                gpu += gpu_answers
                cpu += _answers(on_cpu, model, blobs[start : start + 12])[1]
            for index, (g, c) in enumerate(zip(gpu, cpu, strict=True)):
                worst = max(abs(g[label] - c[label]) for label in c)
                assert worst <= allowed, (model, index, g, c)
                if max(c.values()) > 0.5 + allowed:
                    assert max(g, key=g.__getitem__) == max(c, key=c.__getitem__), (model, index)
        metrics = httpx.get(f"{on_gpu.url}/metrics", timeout=10).text
        for model in tolerance:
            assert f'catdog_images_total{{model="{model}"}} {float(len(blobs))}' in metrics


@needs_gpu
def test_tiny_models_on_cuda_answer_like_on_cpu(tiny_models_dir: Path, tmp_path: Path) -> None:
    blobs = [jpeg(), encode(gradient(64, 96).rotate(90), "JPEG"), encode(gradient(200, 150), "PNG")]
    _compare_servers(tiny_models_dir, tmp_path, blobs, {"fast": 1e-3, "slow": 1e-3})


@needs_gpu
@pytest.mark.models
@pytest.mark.skipif(not (BUILT_MODELS / "manifest.json").exists(), reason="run `make models` first")
def test_built_models_on_cuda_answer_like_on_cpu_on_real_photos(tmp_path: Path) -> None:
    """fp32 models within 1e-3 of the CPU (TF32 convolutions included); int8 ones within 0.05:
    on CUDA a QDQ graph runs as dequantize, fp32 operator, quantize, on CPU as integer kernels."""
    photos = shared_photos("cat", 12) + shared_photos("dog", 12)
    blobs = [photo.read_bytes() for photo in photos]
    manifest = load_manifest(BUILT_MODELS / "manifest.json")
    tolerance = {name: (1e-3 if e.precision == "fp32" else 0.05) for name, e in manifest.models.items()}
    _compare_servers(BUILT_MODELS, tmp_path, blobs, tolerance)
