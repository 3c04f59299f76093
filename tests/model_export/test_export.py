"""Export parity and int8 reproducibility on a tiny randomly initialised network (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from catdog_core.sessions import cpu_session, run_batches
from model_export import onnx_tools
from model_export.channel_padding import WIDENED_KEY, group_count
from model_export.parity import PARITY_TOLERANCE, compare, synthetic_images
from model_export.quantize import quantize

keras = pytest.importorskip("keras")


def tiny_keras_classifier(size: int = 32) -> keras.Model:
    keras.utils.set_random_seed(0)
    image = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(image)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)  # tf2onnx leaves this one as Mul/Add unless folded
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.SeparableConv2D(16, 3, padding="same")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(image, keras.layers.Dense(2, name="logits")(x))
    # Non-trivial batch-norm statistics, as a trained network would have.
    rng = np.random.default_rng(1)
    for bn in (layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)):
        bn.set_weights(
            [rng.uniform(0.5, 1.5, 8), rng.normal(0, 0.1, 8), rng.normal(0, 0.1, 8), rng.uniform(0.5, 2, 8)]
        )
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[keras.Model, Path]:
    model = tiny_keras_classifier()
    path = tmp_path_factory.mktemp("export") / "tiny.onnx"
    onnx_tools.export_keras(model, path)
    return model, path


def test_onnx_matches_keras_within_tolerance(exported: tuple[keras.Model, Path]) -> None:
    model, path = exported
    images = synthetic_images(32, 24)
    parity = compare(
        model.predict(images, verbose=0),
        run_batches(cpu_session(path, 1), images),
        1.0,
        "keras",
    )
    assert parity.max_abs_diff_probability <= PARITY_TOLERANCE
    assert parity.prediction_agreement == 1.0


def test_export_has_dynamic_batch_and_counts_flops(exported: tuple[keras.Model, Path]) -> None:
    _, path = exported
    ops = onnx_tools.check(path)
    assert ops["Conv"] == 4  # conv, depthwise, separable's depthwise and pointwise
    assert ops.get("Mul", 0) <= 1 and ops.get("Add", 0) <= 1  # only the input scaling is left
    model = onnx.load(str(path))
    used = {name for node in model.graph.node for name in node.input}
    assert all(init.name in used for init in model.graph.initializer)  # folded constants are gone
    sess = cpu_session(path, 1)
    for batch in (1, 5):
        assert sess.run(None, {"image": synthetic_images(32, batch)})[0].shape == (batch, 2)
    # Conv 3x3x3->8 on 16x16, two depthwise 3x3 on 16x16x8, pointwise 8->16, dense 16->2.
    expected_macs = 16 * 16 * 8 * 27 + 2 * 16 * 16 * 8 * 9 + 16 * 16 * 16 * 8 + 16 * 2
    assert onnx_tools.count_flops(path) == 2 * expected_macs


def test_export_widens_depthwise_streams_for_the_fast_int8_kernel(exported: tuple[keras.Model, Path]) -> None:
    """The tiny network's 8-channel ReLU6 stream is exported at 16 channels (the parity test above
    holds on the widened file, and its FLOPs are the 8-channel network's)."""
    model = onnx.load(str(exported[1]))
    groups = [group_count(node) for node in model.graph.node if node.op_type == "Conv"]
    assert [g for g in groups if g > 1] == [16, 16]
    assert {p.key for p in model.metadata_props} == {WIDENED_KEY}


def test_export_is_byte_identical_whatever_ran_before(tmp_path: Path) -> None:
    first, second = tmp_path / "first.onnx", tmp_path / "second.onnx"
    model = tiny_keras_classifier()
    onnx_tools.export_keras(model, first)
    onnx_tools.export_keras(
        tiny_keras_classifier(size=24), tmp_path / "other.onnx"
    )  # advances tf2onnx's counters
    onnx_tools.export_keras(model, second)
    assert first.read_bytes() == second.read_bytes()


def test_int8_rebuilds_identically_from_the_committed_ranges(
    exported: tuple[keras.Model, Path], tmp_path: Path
) -> None:
    _, fp32 = exported
    cache = tmp_path / "ranges.json"
    quantize(fp32, tmp_path / "first.onnx", cache, "image", synthetic_images(32, 16, seed=3))
    assert cache.exists()
    quantize(fp32, tmp_path / "again.onnx", cache, "image", None)  # no images: ranges from the cache
    assert (tmp_path / "first.onnx").read_bytes() == (tmp_path / "again.onnx").read_bytes()
    images = synthetic_images(32, 16, seed=4)
    parity = compare(
        run_batches(cpu_session(fp32, 1), images),
        run_batches(cpu_session(tmp_path / "again.onnx", 1), images),
        1.0,
        "fp32",
    )
    assert parity.max_abs_diff_probability < 0.1


def test_quantize_without_images_or_cache_is_an_error(
    exported: tuple[keras.Model, Path], tmp_path: Path
) -> None:
    _, fp32 = exported
    with pytest.raises(FileNotFoundError, match="int8 activation ranges"):
        quantize(fp32, tmp_path / "q.onnx", tmp_path / "absent.json", "image", None)
