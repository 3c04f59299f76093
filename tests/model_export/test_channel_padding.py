"""Channel streams widened to a multiple of 16 for onnxruntime's fast int8 depthwise kernel: the
model must compute exactly what it did, count the same FLOPs, and quantize with the ranges
measured before it was widened."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from model_export.channel_padding import group_count, narrow_depthwise_channels, pad_depthwise_channels
from model_export.onnx_tools import count_flops
from model_export.quantize import quantize

CHANNELS = 24  # not a multiple of 16: widened to 32


def residual_block(channels_out: str = "logits") -> onnx.ModelProto:
    """image -> conv 3->24 -> [relu -> depthwise -> pointwise 24->24] + shortcut -> relu -> max pool
    -> depthwise -> pointwise 24->4 -> pooled logits: Xception's middle flow in miniature.
    channels_out="stream": the 24-channel sum is also a graph output (cannot be widened)."""
    rng = np.random.default_rng(0)
    c = CHANNELS
    weights = {
        "stem_w": rng.normal(size=(c, 3, 3, 3)),
        "stem_b": rng.normal(size=c),
        "dw1_w": rng.normal(size=(c, 1, 3, 3)),
        "pw1_w": rng.normal(size=(c, c, 1, 1)) / 5,
        "pw1_b": rng.normal(size=c),
        "dw2_w": rng.normal(size=(c, 1, 3, 3)),
        "pw2_w": rng.normal(size=(4, c, 1, 1)) / 5,
        "pw2_b": rng.normal(size=4),
    }
    nodes = [
        helper.make_node("Conv", ["image", "stem_w", "stem_b"], ["stem"], pads=[1, 1, 1, 1], name="stem"),
        helper.make_node("Relu", ["stem"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "dw1_w"], ["d1"], group=c, pads=[1, 1, 1, 1], name="dw1"),
        helper.make_node("Conv", ["d1", "pw1_w", "pw1_b"], ["p1"], name="pw1"),
        helper.make_node("Add", ["p1", "stem"], ["sum"], name="sum"),
        helper.make_node("Relu", ["sum"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["m"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Conv", ["m", "dw2_w"], ["d2"], group=c, pads=[1, 1, 1, 1], name="dw2"),
        helper.make_node("Conv", ["d2", "pw2_w", "pw2_b"], ["p2"], name="pw2"),
        helper.make_node("GlobalAveragePool", ["p2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["logits"], name="flatten"),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 4])]
    if channels_out == "stream":
        outputs.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT, [None, c, 16, 16]))
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 16, 16])],
        outputs,
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto | Path, images: np.ndarray) -> np.ndarray:
    source = model if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": images})[0]


def images(n: int = 8) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, 3, 16, 16)).astype(np.float32)


def test_a_stream_of_24_channels_is_widened_to_32_and_computes_the_same() -> None:
    model = residual_block()
    before = run(model, images())
    assert pad_depthwise_channels(model) == 2
    onnx.checker.check_model(model, full_check=True)
    nodes = {node.name: node for node in model.graph.node}
    assert group_count(nodes["dw1"]) == group_count(nodes["dw2"]) == 32
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    assert weights["stem_w"].shape == (32, 3, 3, 3) and weights["pw1_w"].shape == (32, 32, 1, 1)
    assert weights["pw2_w"].shape == (4, 32, 1, 1)  # reads the stream: wider input, same filters
    assert not weights["stem_w"][CHANNELS:].any() and not weights["pw2_w"][:, CHANNELS:].any()
    np.testing.assert_allclose(run(model, images()), before, rtol=1e-5, atol=1e-5)


def test_a_stream_that_leaves_the_graph_is_left_as_it_is() -> None:
    model = residual_block(channels_out="stream")
    unchanged = model.SerializeToString()
    assert pad_depthwise_channels(model) == 0
    assert model.SerializeToString() == unchanged


def test_the_padding_is_not_counted_as_flops(tmp_path: Path) -> None:
    plain, widened = tmp_path / "plain.onnx", tmp_path / "widened.onnx"
    model = residual_block()
    onnx.save(model, str(plain))
    pad_depthwise_channels(model)
    onnx.save(model, str(widened))
    assert count_flops(widened) == count_flops(plain)


def test_narrowing_gives_back_the_model_as_it_was() -> None:
    model = residual_block()
    before = model.SerializeToString()
    pad_depthwise_channels(model)
    assert narrow_depthwise_channels(model) == 1  # one stream, two depthwise convolutions
    assert model.SerializeToString() == before


def test_ranges_measured_on_the_widened_model_are_those_of_the_model(tmp_path: Path) -> None:
    """Percentiles over a stream's activations would count the zero channels too: calibration
    narrows the model first, so `build --int8-ranges` measures what it measured before."""
    plain, widened = tmp_path / "plain.onnx", tmp_path / "widened.onnx"
    model = residual_block()
    onnx.save(model, str(plain))
    pad_depthwise_channels(model)
    onnx.save(model, str(widened))
    quantize(plain, tmp_path / "plain-int8.onnx", tmp_path / "plain.json", "image", images(32))
    quantize(widened, tmp_path / "widened-int8.onnx", tmp_path / "widened.json", "image", images(32))
    assert (tmp_path / "widened.json").read_text() == (tmp_path / "plain.json").read_text()
    np.testing.assert_allclose(
        run(tmp_path / "widened-int8.onnx", images()), run(tmp_path / "plain-int8.onnx", images()), atol=1e-5
    )


def test_the_widened_model_quantizes_with_the_ranges_measured_before(tmp_path: Path) -> None:
    """The committed activation ranges were measured on the models before they were widened; the
    widened int8 model must compute what the int8 model of the plain one computes."""
    plain, widened = tmp_path / "plain.onnx", tmp_path / "widened.onnx"
    model = residual_block()
    onnx.save(model, str(plain))
    pad_depthwise_channels(model)
    onnx.save(model, str(widened))
    ranges = tmp_path / "ranges.json"
    quantize(plain, tmp_path / "plain-int8.onnx", ranges, "image", images(32))
    quantize(widened, tmp_path / "widened-int8.onnx", ranges, "image", None)
    quantized = onnx.load(str(tmp_path / "widened-int8.onnx"))
    assert {group_count(n) for n in quantized.graph.node if n.op_type == "Conv"} == {1, 32}
    np.testing.assert_allclose(
        run(tmp_path / "widened-int8.onnx", images()), run(tmp_path / "plain-int8.onnx", images()), atol=1e-5
    )


def test_a_stream_whose_weights_another_node_shares_is_left_as_it_is() -> None:
    """Widening a weight that two convolutions read would change the other one as well."""
    model = residual_block()
    dw2 = next(node for node in model.graph.node if node.name == "dw2")
    dw2.input[1] = "dw1_w"
    unchanged = model.SerializeToString()
    assert pad_depthwise_channels(model) == 0
    assert model.SerializeToString() == unchanged


def test_relu6_passes_zeros_on_and_a_clip_that_moves_zero_does_not() -> None:
    for low, widened in ((0.0, 2), (0.5, 0)):
        model = residual_block()
        relu = next(node for node in model.graph.node if node.name == "relu1")
        relu.op_type = "Clip"  # ReLU6 as tf2onnx writes it: Clip(x, min, max)
        relu.input.extend(["low", "high"])
        model.graph.initializer.extend(
            [numpy_helper.from_array(np.float32(low), "low"), numpy_helper.from_array(np.float32(6), "high")]
        )
        before = run(model, images())
        assert pad_depthwise_channels(model) == widened, low
        np.testing.assert_allclose(run(model, images()), before, rtol=1e-5, atol=1e-5)
