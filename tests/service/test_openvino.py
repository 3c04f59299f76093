"""The OpenVINO provider path (README, "OpenVINO"). The choice rules run everywhere; the rest drive
the real built models in a real server from .venv-openvino, where onnxruntime-openvino replaces
onnxruntime (`make test` builds that venv)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import onnxruntime as ort
import pytest

from catdog_core.machine import native_bf16
from catdog_core.sessions import CPU, OPENVINO, openvino_options
from service import registry
from service.batching import InferenceLane
from service.manifest import load_manifest
from service.metrics import ServiceMetrics
from service.runtime import (
    BatchingInForce,
    ProviderUnavailable,
    check_precision,
    create_session,
    resolve_providers,
)
from service.settings import Settings
from tests.support import BUILT_MODELS, ROOT, Server, run_server, shared_photos

OPENVINO_PYTHON = ROOT / ".venv-openvino" / "bin" / "python"
needs_openvino_venv = pytest.mark.skipif(
    not OPENVINO_PYTHON.exists(), reason="the OpenVINO venv is not built (make test builds it)"
)
needs_models = pytest.mark.skipif(
    not (BUILT_MODELS / "manifest.json").exists(), reason="run `make models` first"
)


def offer(monkeypatch: pytest.MonkeyPatch, *providers: str) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [*providers, CPU])
    monkeypatch.setattr(ort, "preload_dlls", lambda: None, raising=False)


def test_auto_takes_openvino_where_onnxruntime_offers_it(monkeypatch: pytest.MonkeyPatch) -> None:
    offer(monkeypatch, OPENVINO)
    assert resolve_providers("auto") == [OPENVINO, CPU]
    assert resolve_providers("openvino") == [OPENVINO, CPU]
    assert resolve_providers("cpu") == [CPU]


def test_auto_prefers_a_gpu_to_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    offer(monkeypatch, "CUDAExecutionProvider", OPENVINO)
    assert resolve_providers("auto") == ["CUDAExecutionProvider", CPU]


def test_openvino_named_and_absent_is_an_error_that_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    offer(monkeypatch)
    assert resolve_providers("auto") == [CPU]
    with pytest.raises(ProviderUnavailable, match="install onnxruntime-openvino"):
        resolve_providers("openvino")


def test_each_models_session_is_told_how_many_workers_call_it(
    tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenVINO runs a session's calls one at a time unless it has a stream per caller: two
    workers sharing a MobileNet session made 55 runs a second between them with one stream, 131 with
    two. The registry's sessions are shared by every worker of the lane."""
    concurrency: dict[str, int] = {}

    def recording(path, providers, threads, spinning, concurrent_runs=1, precision="fp32"):  # type: ignore[no-untyped-def]
        concurrency[path.name] = max(concurrent_runs, concurrency.get(path.name, 0))
        return create_session(path, providers, threads, "off", concurrent_runs, precision)

    monkeypatch.setattr(registry, "create_session", recording)
    manifest = load_manifest(tiny_models_dir / "manifest.json")
    paths = {name: tiny_models_dir / entry.file for name, entry in manifest.models.items()}
    lane = InferenceLane(workers=3)
    try:
        registry.load_registry(
            Settings(models_dir=tiny_models_dir, lone_image_on_every_core=False),
            manifest,
            paths,
            [CPU],
            1,
            lane,
            ServiceMetrics(),
            BatchingInForce(min_gain=0.1, max_batch_s=0.5),
        )
    finally:
        lane.shutdown()
    assert concurrency == {path.name: 3 for path in paths.values()}


def test_openvino_gets_a_stream_and_threads_for_each_caller_and_no_pinning() -> None:
    # onnxruntime-openvino 1.24 does not report a session's provider options back
    # (get_provider_options() is empty for it), so the options are checked as built.
    options = openvino_options(threads=2, concurrent_runs=3)
    assert (options["num_streams"], options["num_of_threads"]) == ("3", "6")
    assert json.loads(options["load_config"]) == {"CPU": {"ENABLE_CPU_PINNING": "NO"}}
    assert options["precision"] == "FP32" and options["device_type"] == "CPU"


def test_bf16_is_asked_of_openvinos_cpu_plugin_itself() -> None:
    # The provider's own `precision` option refuses BF16 on the CPU ("CPU only supports FP32,
    # ACCURACY"), and onnxruntime then drops the provider with a warning: the hint goes in load_config.
    options = openvino_options(threads=1, precision="bf16")
    assert "precision" not in options
    plugin = json.loads(options["load_config"])["CPU"]
    assert plugin == {"ENABLE_CPU_PINNING": "NO", "INFERENCE_PRECISION_HINT": "bf16"}


CPUINFO = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu avx2 avx512f {}\n"


def test_bf16_only_where_openvino_runs_on_a_cpu_with_bf16_instructions() -> None:
    with_amx, without = CPUINFO.format("amx_bf16 amx_int8"), CPUINFO.format("avx512_vnni")
    assert native_bf16(with_amx) == ["amx_bf16"]
    assert native_bf16(CPUINFO.format("avx512_bf16")) == ["avx512_bf16"]
    assert native_bf16(without) == []
    check_precision("bf16", [OPENVINO, CPU], with_amx)
    check_precision("fp32", [CPU], without)
    with pytest.raises(ProviderUnavailable, match="amx_bf16 or avx512_bf16"):
        check_precision("bf16", [OPENVINO, CPU], without)
    with pytest.raises(ProviderUnavailable, match="install onnxruntime-openvino"):
        check_precision("bf16", [CPU], with_amx)
    with pytest.raises(ProviderUnavailable, match="applies to the OpenVINO provider"):
        check_precision("bf16", ["CUDAExecutionProvider", CPU], with_amx)


def classify(server: Server, photo: Path, model: str) -> tuple[str, float]:
    response = httpx.post(
        f"{server.url}/classify",
        params={"model": model},
        files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    return result["label"], result["probabilities"]["dog"]


@pytest.mark.models
@pytest.mark.slow
@needs_models
@needs_openvino_venv
def test_every_model_answers_on_openvino_as_on_onnxruntimes_cpu_provider(tmp_path: Path) -> None:
    """Same files, same photos, two servers: the labels agree and the probabilities are close
    (fp32 to rounding; int8 to what a different integer kernel changes: mean |dp| 0.0002-0.0014
    on the 1,265 validation photos, one label in 1,261 test photos). Where the CPU has bf16
    instructions, a third server computes in bf16 (CATDOG_OPENVINO_PRECISION): the same labels on
    these photos, probabilities that moved (it did compute in bf16) but not far."""
    photos = shared_photos("cat", 5) + shared_photos("dog", 5)
    models = list(load_manifest(BUILT_MODELS / "manifest.json").models)
    runs = {"openvino": (OPENVINO_PYTHON, "fp32"), "cpu": (None, "fp32")}
    if native_bf16():
        runs["openvino-bf16"] = (OPENVINO_PYTHON, "bf16")
    answers = {}
    for name, (python, precision) in runs.items():
        provider = name.partition("-")[0]
        settings = {"providers": provider, "openvino_precision": precision}
        with run_server(BUILT_MODELS, tmp_path, python=python, **settings) as server:
            answers[name] = {(m, p.name): classify(server, p, m) for m in models for p in photos}
            listed = httpx.get(f"{server.url}/models").json()["models"]
            expected = OPENVINO if provider == "openvino" else CPU
            assert {m["name"]: m["provider"] for m in listed} == dict.fromkeys(models, expected)
            assert {m["name"]: m["compute_precision"] for m in listed} == dict.fromkeys(models, precision)
            if provider == "openvino":
                assert f"providers ['{OPENVINO}', '{CPU}'] (OpenVINO in {precision})" in server.log()
    for key, (label, dog) in answers["cpu"].items():
        ov_label, ov_dog = answers["openvino"][key]
        assert ov_label == label, key
        assert ov_dog == pytest.approx(dog, abs=1e-4 if "int8" not in key[0] else 0.05), key
    if "openvino-bf16" in answers:
        moved = [abs(answers["openvino-bf16"][key][1] - dog) for key, (_, dog) in answers["openvino"].items()]
        assert [label for label, _ in answers["openvino-bf16"].values()] == [
            label for label, _ in answers["openvino"].values()
        ]
        assert 1e-5 < max(moved) < 0.05, sorted(moved)[-5:]


@pytest.mark.models
@needs_models
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"providers": "openvino"}, "install onnxruntime-openvino"),
        ({"openvino_precision": "bf16"}, "openvino_precision=bf16 applies to the OpenVINO provider"),
    ],
    ids=["providers=openvino", "openvino_precision=bf16"],
)
def test_a_server_told_to_use_openvino_without_it_does_not_start(
    tmp_path: Path, setting: dict[str, str], message: str
) -> None:
    if OPENVINO in ort.get_available_providers():
        pytest.skip("this onnxruntime has the OpenVINO provider")
    with pytest.raises(RuntimeError, match=message), run_server(BUILT_MODELS, tmp_path, **setting):
        pass


def report_in_openvino_venv(function: str, arguments: str) -> subprocess.CompletedProcess[str]:
    """What model_export.report's `function` prints for the built models, run in .venv-openvino."""
    script = (
        f"from pathlib import Path; from model_export.report import {function}; "
        "from service.manifest import load_manifest; "
        f"folder = Path({str(BUILT_MODELS)!r}); "
        f"print({function}(load_manifest(folder / 'manifest.json'), folder, {arguments}))"
    )
    command = [str(OPENVINO_PYTHON), "-c", script]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)


@pytest.mark.models
@needs_models
@needs_openvino_venv
def test_report_times_each_int8_variant_on_openvino_too() -> None:
    """In .venv-openvino, the speed-ups on both CPU providers (make report's OpenVINO lines come from
    there), a few pairs on one thread; the figures are printed, never asserted."""
    printed = report_in_openvino_venv("int8_speedups", "threads=(1,), pairs=4")
    models = load_manifest(BUILT_MODELS / "manifest.json").models
    for name in [n for n, e in models.items() if e.precision == "int8"]:
        lines = [line for line in printed.stdout.splitlines() if line.startswith(f"{name}:")]
        assert len(lines) == 2, printed.stdout  # onnxruntime's CPU provider, then OpenVINO
        assert "(OpenVINO, 1 threads" in lines[1] and "OpenVINO" not in lines[0], printed.stdout


@pytest.mark.models
@needs_models
@needs_openvino_venv
def test_report_times_the_fp32_models_in_bf16_where_the_cpu_has_it() -> None:
    """make report's bf16 lines (its second step runs in .venv-openvino): a line per fp32 model
    where the CPU computes bf16 in hardware, none elsewhere; figures printed, never asserted."""
    printed = report_in_openvino_venv("bf16_speedups", "pairs=4")
    models = load_manifest(BUILT_MODELS / "manifest.json").models
    fp32 = sorted(name for name, entry in models.items() if entry.precision == "fp32")
    lines = [line for line in printed.stdout.splitlines() if " in bf16 on OpenVINO: " in line]
    assert sorted(line.split(" ", 1)[0] for line in lines) == (fp32 if native_bf16() else []), printed.stdout
