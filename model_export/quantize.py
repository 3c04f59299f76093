"""Static int8 quantization (QDQ, per-channel) with onnxruntime.quantization.

Activation ranges come from a committed ranges file: computed once from training images by a
developer (`build --int8-ranges`) and committed, so every later build reproduces the same int8
model without the dataset. Percentile calibration is used because MinMax ranges, stretched by a
few extreme activations, destroyed Xception's accuracy (see the README, "Building the models").

Weights are 7-bit except the depthwise convolutions' (8-bit), so that the int8 model computes the
same on every x86 CPU: without VNNI (AVX2, AVX-512 without VNNI) onnxruntime's uint8 x int8
matrix kernels add pairs of products in int16 (VPMADDUBSW), which saturates with 8-bit weights.
Built with 8-bit weights throughout, mobilenet-int8 measured 96.44 % on validation on an AVX2 CPU
against 99.21 % on a VNNI one; with 7-bit weights everywhere it lost 0.8 points on a source
against fp32; keeping the depthwise weights at 8 bits brought it back within 0.3, and its fused
answers stayed within 0.044 in probability of its QDQ graph run unfused, so the depthwise kernel
does not saturate (docs/models.md, "int8 and the hardware").

Each convolution's bias is then corrected for the mean error its quantized weights make
(`correct_biases`: bias correction, Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction", 2019). Rounding the weights to 7 bits moves every output
channel's mean by (Wq - W) E[x], and across MobileNet's 27 layers that systematic part was most of
what int8 changed: run as written on 422 validation photos, the whole int8 graph moved its
probabilities by 0.0031 on average, the weights alone (every activation left in fp32) by 0.0031,
the activations alone by 0.0006. The inputs' means E[x] are measured on the range photos with the
ranges and committed beside them (`input_means_file`), so a rebuild needs no dataset for them
either.

The depthwise convolutions cannot simply be left in fp32 (nodes_to_exclude): onnxruntime's
WeightBiasQuantization graph transformer, run when the file is loaded, quantizes the weights of an
fp32 convolution between a DequantizeLinear and a QuantizeLinear per tensor, which ruined
mobilenet-int8 (83 % on validation). With that transformer disabled the file was accurate but
slower than this one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from model_export.channel_padding import group_count, is_depthwise, narrow_depthwise_channels

log = logging.getLogger(__name__)
PERCENTILE = 99.99
MEANS_DIGITS = 7  # significant digits kept in the committed input means: each rounded by < 5e-7 of itself


class _Reader(CalibrationDataReader):
    def __init__(self, input_name: str, images: np.ndarray, batch: int = 8) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            {input_name: images[i : i + batch]} for i in range(0, len(images), batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def classifier_head(model_path: Path) -> list[str]:
    """The last matrix product (the dense logits layer): kept in fp32.

    It costs a few thousand multiply-adds, and quantizing it is what tipped MobileNet-224 over the
    keep rule: with everything int8 it lost 2 photos of 513 on one source on validation (0.39
    points); with the head in fp32, 1 (0.27). Quantizing one conv layer less instead was tried
    layer by layer: most single exclusions made it worse (one, 19 points worse).
    """
    nodes = onnx.load(str(model_path)).graph.node
    return [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")][-1:]


def depthwise_weights(model_path: Path) -> list[str]:
    """The weight tensors of the depthwise convolutions (one group per channel): kept 8-bit."""
    return [n.input[1] for n in onnx.load(str(model_path)).graph.node if is_depthwise(n)]


def input_means_file(ranges: Path) -> Path:
    """Where the convolutions' input means are kept: beside the activation ranges they were
    measured with (`x.ranges.json` -> `x.input-means.json`)."""
    return ranges.with_name(ranges.name.removesuffix(".json").removesuffix(".ranges") + ".input-means.json")


def quantize(fp32: Path, int8: Path, cache: Path, input_name: str, images: np.ndarray | None) -> None:
    """Write int8 from fp32. With images, (re)compute the activation ranges (cache) and the
    convolutions' input means from them; else both files must exist.

    Both are measured on the model without the zero channels the export adds for the fast int8
    kernels (model_export.channel_padding): percentiles over 736 channels of which 8 are zero are
    not those of the model's 728, and the committed ranges were measured without them."""
    means = input_means_file(cache)
    if images is None and not (cache.exists() and means.exists()):
        raise FileNotFoundError(
            f"no int8 activation ranges or input means at {cache}, {means}; "
            "run `build --int8-ranges --data DIR`"
        )
    if images is not None:
        cache.unlink(missing_ok=True)
        model = onnx.load(str(fp32))
        narrowed = narrow_depthwise_channels(model)
        write_means(means, conv_input_means(model, input_name, images))
        if narrowed:
            narrowed_path = int8.with_suffix(".narrowed.onnx")
            onnx.save(model, str(narrowed_path))
            try:
                _quantize_static(narrowed_path, int8, cache, input_name, images)  # writes the cache
            finally:
                narrowed_path.unlink(missing_ok=True)
            images = None
    _quantize_static(fp32, int8, cache, input_name, images)
    quantized = onnx.load(str(int8))
    corrected = correct_biases(quantized, onnx.load(str(fp32)), read_means(means))
    log.info("%s: %d convolution biases corrected for their weights' rounding", int8.name, corrected)
    onnx.save(quantized, str(int8))


def conv_input_means(model: onnx.ModelProto, input_name: str, images: np.ndarray) -> dict[str, list[float]]:
    """Each convolution's data input (NCHW) averaged over the images and its positions: a mean per
    channel, by tensor name. The graph runs unoptimized, so that every such tensor exists. A zero
    Pad's input is measured too: quantization folds the Pad into the convolution after it (MobileNet's
    stride-2 layers), which then reads that tensor."""
    fed = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    names = sorted({n.input[0] for n in model.graph.node if n.op_type in ("Conv", "Pad")} - fed)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in present)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    totals = {name: np.zeros(0) for name in names}
    for start in range(0, len(images), 4):
        values = session.run(names, {input_name: images[start : start + 4]})
        for name, value in zip(names, values, strict=True):
            per_channel = value.astype(np.float64).mean(axis=(2, 3)).sum(axis=0)
            totals[name] = totals[name] + per_channel if totals[name].size else per_channel
    return {name: (total / len(images)).tolist() for name, total in totals.items()}


def write_means(path: Path, means: dict[str, list[float]]) -> None:
    rounded = {name: [float(f"{v:.{MEANS_DIGITS}g}") for v in values] for name, values in means.items()}
    path.write_text(json.dumps(rounded, sort_keys=True) + "\n")


def read_means(path: Path) -> dict[str, list[float]]:
    return dict(json.loads(path.read_text()))


def correct_biases(int8: onnx.ModelProto, fp32: onnx.ModelProto, means: dict[str, list[float]]) -> int:
    """Subtract from each quantized convolution's bias the mean error of its rounded weights on
    its inputs, E[(Wq - W) x] per output channel; returns how many were corrected. A convolution
    whose input or weights are not quantized, or that has no bias, is left as it is (Xception's
    depthwise convolutions have none: their 8-bit weights' error stays). Channels the export added
    (zeros throughout) have no measured mean: zero, which is theirs."""
    initializers = {t.name: t for t in int8.graph.initializer}
    producers = {out: node for node in int8.graph.node for out in node.output}
    fp32_weights = {n.name: n.input[1] for n in fp32.graph.node if n.op_type == "Conv"}
    originals = {t.name: t for t in fp32.graph.initializer}
    corrected = 0
    for conv in (n for n in int8.graph.node if n.op_type == "Conv" and len(n.input) > 2):
        source = _quantized_source(conv.input[0], producers)
        weight = producers.get(conv.input[1])
        if source not in means or weight is None or weight.op_type != "DequantizeLinear":
            continue
        if conv.name not in fp32_weights:  # quantization keeps node names; a rename would need a map
            raise ValueError(f"{conv.name}: no convolution of that name in the fp32 model")
        error = _dequantized(weight, initializers) - numpy_helper.to_array(originals[fp32_weights[conv.name]])
        per_output = error.sum(axis=(2, 3))  # out x in-per-group
        group = group_count(conv)
        mean = np.zeros(per_output.shape[1] * group)
        mean[: len(means[source])] = means[source]
        outputs_per_group = per_output.shape[0] // group
        mean_seen = mean.reshape(group, -1)[np.arange(per_output.shape[0]) // outputs_per_group]
        _shift_bias(conv.input[2], -(per_output * mean_seen).sum(axis=1), producers, initializers)
        corrected += 1
    return corrected


def _quantized_source(tensor: str, producers: dict[str, onnx.NodeProto]) -> str | None:
    """The fp32 tensor x behind DequantizeLinear(QuantizeLinear(x)), if that is what feeds a node."""
    dequantize = producers.get(tensor)
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return None
    quantize = producers.get(dequantize.input[0])
    return quantize.input[0] if quantize and quantize.op_type == "QuantizeLinear" else None


def _dequantized(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> np.ndarray:
    values = numpy_helper.to_array(initializers[node.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
    zero = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64) if node.input[2:] else 0.0
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    shape = [-1 if i == axis else 1 for i in range(values.ndim)] if np.ndim(scale) else []
    dequantized: np.ndarray = (values - np.reshape(zero, shape)) * np.reshape(scale, shape)
    return dequantized


def _shift_bias(
    name: str,
    shift: np.ndarray,
    producers: dict[str, onnx.NodeProto],
    initializers: dict[str, onnx.TensorProto],
) -> None:
    """Add shift to a bias: an fp32 initializer, or int32 values behind a DequantizeLinear (then
    shifted by whole steps of their own scale)."""
    dequantize = producers.get(name)
    if dequantize is None:
        tensor = initializers[name]
        shifted = numpy_helper.to_array(tensor).astype(np.float64) + shift
        tensor.CopyFrom(numpy_helper.from_array(shifted.astype(np.float32), tensor.name))
        return
    tensor = initializers[dequantize.input[0]]
    steps = np.round(shift / numpy_helper.to_array(initializers[dequantize.input[1]]).astype(np.float64))
    shifted = numpy_helper.to_array(tensor).astype(np.int64) + steps.astype(np.int64)
    tensor.CopyFrom(numpy_helper.from_array(shifted.astype(np.int32), tensor.name))


def _quantize_static(fp32: Path, int8: Path, cache: Path, input_name: str, images: np.ndarray | None) -> None:
    prepared = int8.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    try:
        head = classifier_head(prepared)
        quantize_static(
            str(prepared),
            str(int8),
            _Reader(input_name, images) if images is not None else None,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,  # 7-bit weights (the module's docstring says why)
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            calibration_cache_path=cache,
            nodes_to_exclude=head,
            extra_options={
                "CalibPercentile": PERCENTILE,
                "TensorQuantOverrides": {
                    weight: [{"axis": 0, "reduce_range": False}] for weight in depthwise_weights(prepared)
                },
            },
        )
    finally:
        prepared.unlink(missing_ok=True)
