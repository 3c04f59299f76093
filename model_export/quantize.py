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

The depthwise convolutions cannot simply be left in fp32 (nodes_to_exclude): onnxruntime's
WeightBiasQuantization graph transformer, run when the file is loaded, quantizes the weights of an
fp32 convolution between a DequantizeLinear and a QuantizeLinear per tensor, which ruined
mobilenet-int8 (83 % on validation). With that transformer disabled the file was accurate but
slower than this one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from model_export.channel_padding import is_depthwise, narrow_depthwise_channels

log = logging.getLogger(__name__)
PERCENTILE = 99.99


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


def quantize(fp32: Path, int8: Path, cache: Path, input_name: str, images: np.ndarray | None) -> None:
    """Write int8 from fp32. With images, (re)compute the cache from them; else the cache must exist.

    The ranges are measured on the model without the zero channels the export adds for the fast
    int8 kernels (model_export.channel_padding): percentiles over 736 channels of which 8 are zero
    are not those of the model's 728, and the committed ranges were measured without them."""
    if images is None and not cache.exists():
        raise FileNotFoundError(f"no int8 activation ranges at {cache}; run `build --int8-ranges --data DIR`")
    if images is not None:
        cache.unlink(missing_ok=True)
        model = onnx.load(str(fp32))
        if narrow_depthwise_channels(model):
            narrowed = int8.with_suffix(".narrowed.onnx")
            onnx.save(model, str(narrowed))
            try:
                _quantize_static(narrowed, int8, cache, input_name, images)  # writes the cache
            finally:
                narrowed.unlink(missing_ok=True)
            images = None
    _quantize_static(fp32, int8, cache, input_name, images)


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
