"""int8 weights: 7-bit where onnxruntime's kernels sum products in int16 without VNNI, 8-bit for the
depthwise convolutions, whose kernel does not; biases corrected for the weights' rounding."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_export.quantize import input_means_file, quantize


def depthwise_then_dense(path: Path, explicit_pad: bool = False) -> None:
    """uint8 NHWC image -> float -> NCHW -> depthwise 3x3 -> ReLU -> dense 1x1 -> pooled logits.
    explicit_pad: the depthwise convolution's zero padding as a Pad node before it (as tf2onnx
    writes Keras' ZeroPadding2D), which quantization folds into the convolution."""
    rng = np.random.default_rng(0)
    weights = {
        "dw": rng.normal(size=(8, 1, 3, 3)).astype(np.float32),
        "pw": rng.normal(size=(2, 8, 1, 1)).astype(np.float32),
        "dw_bias": rng.normal(size=8).astype(np.float32),
        "pw_bias": rng.normal(size=2).astype(np.float32),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64),
    }
    padding = [helper.make_node("Pad", ["nchw", "pads"], ["padded"])] if explicit_pad else []
    depthwise_input, pads = ("padded", [0, 0, 0, 0]) if explicit_pad else ("nchw", [1, 1, 1, 1])
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2]),
        *padding,
        helper.make_node(
            "Conv", [depthwise_input, "dw", "dw_bias"], ["d"], group=8, pads=pads, name="depthwise"
        ),
        helper.make_node("Relu", ["d"], ["r"]),
        helper.make_node("Conv", ["r", "pw", "pw_bias"], ["p"], name="dense"),
        helper.make_node("GlobalAveragePool", ["p"], ["g"]),
        helper.make_node("Flatten", ["g"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [None, 16, 16, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 2])],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def quantized_weight_ranges(path: Path) -> dict[str, int]:
    """Largest |int8 value| of each quantized weight, by the name of the Conv that reads it."""
    model = onnx.load(str(path))
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    ranges = {}
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        dequantize = producers[conv.input[1]]
        ranges[conv.name] = int(np.abs(initializers[dequantize.input[0]].astype(np.int32)).max())
    return ranges


def test_dense_weights_are_7_bit_and_depthwise_weights_8_bit(tmp_path: Path) -> None:
    fp32, int8 = tmp_path / "tiny.onnx", tmp_path / "tiny-int8.onnx"
    depthwise_then_dense(fp32)
    images = np.random.default_rng(1).integers(0, 256, size=(16, 16, 16, 8), dtype=np.uint8)
    quantize(fp32, int8, tmp_path / "ranges.json", "image", images)
    ranges = quantized_weight_ranges(int8)
    assert ranges["dense"] <= 64  # symmetric 7-bit: -64..64 at most
    assert ranges["depthwise"] == 127  # symmetric 8-bit per channel: each channel's largest is 127


def logits(path: Path, images: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"image": images})[0])


def test_biases_are_corrected_for_the_mean_error_of_the_rounded_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rounding weights moves each output channel's mean by (Wq - W) E[x]; the build subtracts
    that from the bias, with E[x] measured on the range photos and kept beside the ranges. A
    convolution whose Pad quantization folds into it is corrected too."""
    fp32 = tmp_path / "tiny.onnx"
    depthwise_then_dense(fp32, explicit_pad=True)
    caplog.set_level(logging.INFO, logger="model_export.quantize")
    images = np.random.default_rng(1).integers(0, 256, size=(16, 16, 16, 8), dtype=np.uint8)
    ranges = tmp_path / "tiny.ranges.json"
    quantize(fp32, tmp_path / "corrected.onnx", ranges, "image", images)
    assert "2 convolution biases corrected" in caplog.text
    means = input_means_file(ranges)
    assert means == tmp_path / "tiny.input-means.json"
    measured = json.loads(means.read_text())
    assert sorted(measured) == ["nchw", "padded", "r"] and len(measured["r"]) == 8  # per channel
    # The same ranges with every mean zero: no correction.
    means.write_text(json.dumps({name: [0.0] * len(values) for name, values in measured.items()}))
    quantize(fp32, tmp_path / "plain.onnx", ranges, "image", None)
    reference = logits(fp32, images)
    bias_of = {
        name: np.abs((logits(tmp_path / name, images) - reference).mean(axis=0)).max()
        for name in ("corrected.onnx", "plain.onnx")
    }
    assert bias_of["corrected.onnx"] < 0.2 * bias_of["plain.onnx"], bias_of


def test_quantize_without_the_input_means_is_an_error(tmp_path: Path) -> None:
    fp32 = tmp_path / "tiny.onnx"
    depthwise_then_dense(fp32)
    images = np.random.default_rng(1).integers(0, 256, size=(4, 16, 16, 8), dtype=np.uint8)
    ranges = tmp_path / "tiny.ranges.json"
    quantize(fp32, tmp_path / "q.onnx", ranges, "image", images)
    input_means_file(ranges).unlink()
    with pytest.raises(FileNotFoundError, match="input means"):
        quantize(fp32, tmp_path / "q.onnx", ranges, "image", None)
