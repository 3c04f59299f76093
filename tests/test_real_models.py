"""End to end on the real built models (make models) and real photos from the development set."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from catdog_core.probabilities import softmax
from model_export.data import Sample, Split, load_images, stratified_split
from model_export.evaluate import logits_on, metrics
from model_export.records import read_training_record
from model_export.specs import TRAINING_RECORD
from service.manifest import Manifest, load_manifest
from tests.support import BUILT_MODELS, ROOT, SHARED_DATA_ROOTS, Server, run_server

pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(not (BUILT_MODELS / "manifest.json").exists(), reason="run `make models` first"),
    pytest.mark.skipif(
        not all(root.is_dir() for root in SHARED_DATA_ROOTS),
        reason="the development dataset is not beside the checkout",
    ),
]
N_PER_STRATUM = 4  # photos per (class, source) from the test split


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(BUILT_MODELS / "manifest.json")


@pytest.fixture(scope="module")
def split() -> Split:
    return stratified_split(SHARED_DATA_ROOTS, read_training_record(TRAINING_RECORD).split.seed)


@pytest.fixture(scope="module")
def test_samples(split: Split) -> list[Sample]:
    """A few photos of each class and source from the documented test split (never tuned on)."""
    strata = sorted({(s.label, s.source) for s in split.samples["test"]})
    return [
        s
        for stratum in strata
        for s in [t for t in split.samples["test"] if (t.label, t.source) == stratum][:N_PER_STRATUM]
    ]


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(BUILT_MODELS, tmp_path_factory.mktemp("real"), intra_op_threads="2") as server:
        yield server


def classify(server: Server, blobs: list[bytes], model: str) -> list[dict[str, object]]:
    files = [("file", (f"{i}.jpg", blob, "image/jpeg")) for i, blob in enumerate(blobs)]
    response = httpx.post(f"{server.url}/classify", params={"model": model}, files=files, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_manifest_carries_per_source_figures_for_the_documented_split(
    manifest: Manifest, split: Split
) -> None:
    assert manifest.dataset is not None and manifest.dataset.split_sha256 == split.sha256
    assert manifest.dataset.images_by_source == split.source_counts()
    for name, entry in manifest.models.items():
        assert entry.test is not None, f"{name} has no measured test accuracy"
        assert set(entry.test.by_source) == set(split.sources), name
        # Sanity floors, far below the figures reported in the README: they catch a broken build.
        floor = 0.98 if entry.family == "xception" else 0.95
        assert entry.test.hardest_source[1] >= floor, f"{name}: {entry.test.hardest_source} < {floor}"
        assert entry.parity.max_abs_diff_probability <= (1e-4 if entry.precision == "fp32" else 1.0)
    assert {"xception", "mobilenet", "mobilenet-160"} <= set(manifest.models)


def _assert_reproduces_the_record(manifest: Manifest, split: Split, name: str) -> None:
    entry = manifest.models[name]
    assert entry.test is not None
    loaded = load_images(split.samples["test"], entry.input.width, f"{name} test photos")
    measured = metrics(
        logits_on(BUILT_MODELS / entry.file, loaded.arrays),
        loaded.labels,
        entry.temperature,
        "test",
        np.asarray(loaded.sources),
    )
    assert measured.n_images == entry.test.n_images
    # fp32 reproduces the record exactly; an int8 variant within one photo per source, as its
    # requantization rounding may differ between CPU kernels.
    exact = entry.precision == "fp32"
    for source, figures in entry.test.by_source.items():
        one_photo = 1.0 / figures.n_images
        got = measured.by_source[source]
        assert got.accuracy == pytest.approx(figures.accuracy, abs=1e-9 if exact else 1.01 * one_photo), (
            name,
            source,
        )
        assert got.log_loss == pytest.approx(figures.log_loss, rel=1e-3 if exact else 0.05), (name, source)


@pytest.mark.slow
def test_recorded_figures_are_what_the_built_model_measures(manifest: Manifest, split: Split) -> None:
    """`make models` takes its accuracy figures from the evaluation recorded with the weights; the
    model built here must reproduce them on the test split (MobileNet-160: the quickest to check)."""
    _assert_reproduces_the_record(manifest, split, "mobilenet-160")


@pytest.mark.slow
def test_the_cheapest_int8_variant_keeps_its_recorded_figures_on_this_cpu(
    manifest: Manifest, split: Split
) -> None:
    """int8 kernels differ by CPU: built with 8-bit weights, mobilenet-int8 measured 98.4 % on test
    on a CPU with VNNI and 95.7 % on one without (AVX2 sums saturate), while the manifest promised
    the first. The cheapest int8 variant (fewest FLOPs) must measure its recorded figures here too:
    the whole test split through xception-int8 took 340 s of a 21-minute suite on a slow 2-core VM,
    so the others are held to their graphs by the kernel drift test below."""
    variants = {name: entry for name, entry in manifest.models.items() if entry.precision == "int8"}
    assert variants, "no int8 variant in the manifest"
    _assert_reproduces_the_record(manifest, split, min(variants, key=lambda name: variants[name].flops))


def int8_kernel_drift(path: Path, images: np.ndarray) -> float:
    """Largest probability difference between the int8 model as served (fused integer kernels)
    and its QDQ graph run as written (dequantize, fp32 operator, quantize: no integer sums)."""

    def probabilities(level: ort.GraphOptimizationLevel) -> np.ndarray:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return softmax(
            np.concatenate(
                [session.run(None, {name: images[i : i + 8]})[0] for i in range(0, len(images), 8)]
            )
        )

    served = probabilities(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    as_written = probabilities(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return float(np.abs(served - as_written).max())


def test_int8_kernels_on_this_cpu_compute_what_the_graph_says(
    manifest: Manifest, test_samples: list[Sample]
) -> None:
    """Without VNNI, onnxruntime's uint8 x int8 kernels saturate int16 sums of 8-bit weights: the
    old mobilenet-int8 drifted by up to 0.72 in probability from its own graph on an AVX2 CPU
    (0.04 with today's 7-bit weights). On a CPU with VNNI this holds either way."""
    for name, entry in manifest.models.items():
        if entry.precision != "int8":
            continue
        images = load_images(test_samples, entry.input.width, name).arrays
        drift = int8_kernel_drift(BUILT_MODELS / entry.file, images)
        assert drift <= 0.1, f"{name}: served int8 differs from its graph by {drift:.3f} in probability"


def test_every_model_answers_correctly_on_real_photos_and_matches_the_build(
    real_server: Server, manifest: Manifest, test_samples: list[Sample]
) -> None:
    blobs = [s.path.read_bytes() for s in test_samples]
    labels = np.array([s.label for s in test_samples])
    for name, entry in manifest.models.items():
        results = [r for i in range(0, len(blobs), 8) for r in classify(real_server, blobs[i : i + 8], name)]
        served = np.array([[r["probabilities"][label] for label in entry.labels] for r in results])
        accuracy = float((served.argmax(1) == labels).mean())
        assert accuracy >= 0.9, f"{name}: {accuracy:.3f} on {len(labels)} test photos"
        # Golden parity: the service reproduces the build's own probabilities on the same files.
        images = load_images(test_samples, entry.input.width, "golden").arrays
        built = softmax(logits_on(BUILT_MODELS / entry.file, images), entry.temperature)
        assert np.abs(served - built).max() <= 1e-4, name


def test_exif_rotated_photo_keeps_its_label(real_server: Server, test_samples: list[Sample]) -> None:
    photo = Image.open(test_samples[0].path).convert("RGB")
    # Store the pixels turned a quarter left and tag orientation 6 ("turn right to view"):
    # viewers and the service show the original upright photo.
    stored = photo.transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    upright = io.BytesIO()
    photo.save(upright, "JPEG", quality=95)
    for model in ("xception", "mobilenet"):
        original, rotated = classify(real_server, [upright.getvalue(), buffer.getvalue()], model)
        assert original["label"] == rotated["label"] == ("cat", "dog")[test_samples[0].label]
        assert abs(original["confidence"] - rotated["confidence"]) < 0.05


@pytest.mark.slow
def test_verify_command_passes_on_the_built_models() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "model_export",
            "verify",
            "--out",
            str(BUILT_MODELS),
            "--data",
            *map(str, SHARED_DATA_ROOTS),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "FAILED" not in result.stderr


def test_models_endpoint_reports_live_latency(real_server: Server, test_samples: list[Sample]) -> None:
    classify(real_server, [test_samples[0].path.read_bytes()], "mobilenet")
    info = httpx.get(f"{real_server.url}/models/mobilenet").json()
    assert info["live_latency_p50_ms"] is not None and info["live_latency_p50_ms"] > 0
    assert info["test_accuracy"] >= 0.97
    assert info["selection_accuracy"] == min(info["test_accuracy_by_source"].values())


def test_tritonclient_gets_the_built_models_answers_on_real_photos(
    real_server: Server, test_samples: list[Sample]
) -> None:
    triton = pytest.importorskip("tritonclient.http")
    client = triton.InferenceServerClient(real_server.url.removeprefix("http://"))
    blobs = [s.path.read_bytes() for s in test_samples[:8]]
    for model in ("xception", "mobilenet", "cascade"):
        image = triton.InferInput("image", [len(blobs)], "BYTES")
        image.set_data_from_numpy(np.array(blobs, dtype=np.object_))
        result = client.infer(model, [image])
        expected = classify(real_server, blobs, model)
        served = result.as_numpy("probabilities")
        wanted = np.array([[r["probabilities"]["cat"], r["probabilities"]["dog"]] for r in expected])
        assert np.abs(served - wanted).max() <= 1e-6, model
        assert [v.decode() for v in result.as_numpy("label")] == [r["label"] for r in expected]
    client.close()


def test_demo_page_compares_the_built_models_on_a_real_photo(
    real_server: Server, test_samples: list[Sample], tmp_path: Path
) -> None:
    """The compare view on a real photo; CATDOG_DOCS_SCREENSHOT=path also saves it there (README)."""
    from tests.service.test_demo_page import CHROMIUM, compare_rows, page_of

    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (make test installs it in CI)")
    dog = next(s for s in test_samples if s.label == 1)
    with page_of(real_server) as page:
        page.set_input_files("#file", [str(dog.path)])
        page.fill("#budget", "1000")
        page.click("#compare")
        rows = compare_rows(page)
        assert list(rows)[-2:] == ["auto", "cascade"] and {"xception", "mobilenet"} <= set(rows)
        for mode, cells in rows.items():
            assert cells[1].startswith("dog"), (mode, cells)
        assert rows["auto"][4].startswith("auto picked")
        page.screenshot(
            path=os.environ.get("CATDOG_DOCS_SCREENSHOT", str(tmp_path / "compare.png")), full_page=True
        )
