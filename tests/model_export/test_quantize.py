"""int8 weights: 7-bit where onnxruntime's kernels sum products in int16 without VNNI, 8-bit for the
depthwise convolutions, whose kernel does not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_export.quantize import quantize


def depthwise_then_dense(path: Path) -> None:
    """uint8 NHWC image -> float -> NCHW -> depthwise 3x3 -> ReLU -> dense 1x1 -> pooled logits."""
    rng = np.random.default_rng(0)
    weights = {
        "dw": rng.normal(size=(8, 1, 3, 3)).astype(np.float32),
        "pw": rng.normal(size=(2, 8, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "dw"], ["d"], group=8, pads=[1, 1, 1, 1], name="depthwise"),
        helper.make_node("Relu", ["d"], ["r"]),
        helper.make_node("Conv", ["r", "pw"], ["p"], name="dense"),
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
