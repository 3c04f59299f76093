"""ONNX export, structural checks, FLOP counting and bare onnxruntime timing."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from model_export.channel_padding import pad_depthwise_channels

log = logging.getLogger(__name__)

OPSET = 17


def export_keras(model: object, path: Path) -> str:
    """Export a Keras (TensorFlow backend) model with a dynamic batch; return the exporter string."""
    import keras
    import tensorflow as tf
    import tf2onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    # One warm call in inference mode, as Keras requires before export.
    shape = (1, *model.inputs[0].shape[1:])
    model(np.zeros(shape, dtype=model.inputs[0].dtype), training=False)
    model.export(str(path), format="onnx", opset_version=OPSET, verbose=False)
    exported = onnx.load(str(path))
    folded = fold_conv_scale_shift(exported)
    if folded:
        log.info("%s: folded %d batch-norm Mul/Add pairs into their convolutions", path.name, folded)
    canonical_names(exported)
    if widened := pad_depthwise_channels(exported):
        log.info("%s: %d depthwise convolutions widened for the fast int8 kernel", path.name, widened)
    onnx.save(exported, str(path))
    check(path)
    versions = f"keras {keras.__version__} (tensorflow {tf.__version__}) + tf2onnx {tf2onnx.__version__}"
    return f"{versions}, opset {OPSET}"


def canonical_names(model: onnx.ModelProto) -> None:
    """Rename nodes, activations and initializers by their position in the graph.

    tf2onnx numbers what it creates with a process-wide counter, so the same model exported after
    another one gets other names. The committed int8 activation ranges are keyed by activation
    names, and the manifest pins each file's sha256: both need names that depend on the graph only.
    """
    graph = model.graph
    graph.doc_string = ""  # "converted from __inference___call___<counter>"
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    renamed: dict[str, str] = {}
    # Initializers are numbered, and stored, in order of first use: tf2onnx's own order varies.
    by_name = {init.name: init for init in graph.initializer}
    # Unused ones (the constants of folded batch norms) are dropped.
    order = list(dict.fromkeys(name for node in graph.node for name in node.input if name in by_name))
    for j, name in enumerate(order):
        if name not in keep:
            renamed[name] = f"init_{j}"
    sorted_inits = [by_name[name] for name in order]
    del graph.initializer[:]
    graph.initializer.extend(sorted_inits)
    for i, node in enumerate(graph.node):
        node.name = f"{node.op_type.lower()}_{i}"
        for k, name in enumerate(node.output):
            if name and name not in keep:
                renamed[name] = f"{node.op_type.lower()}_{i}_out{k}"
    for init in graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for node in graph.node:
        for field in (node.input, node.output):
            for k, name in enumerate(field):
                field[k] = renamed.get(name, name)
    for info in graph.value_info:
        info.name = renamed.get(info.name, info.name)
    for info in (*graph.input, *graph.output):  # tf2onnx's symbolic batch is "unk__<counter>"
        first = info.type.tensor_type.shape.dim[0]
        if first.dim_param:
            first.dim_param = "batch"


def fold_conv_scale_shift(model: onnx.ModelProto, path: Path | None = None) -> int:
    """Fold Conv -> Mul(per-channel const) -> Add(per-channel const) into the Conv; returns the count.

    tf2onnx leaves the batch norm after each depthwise convolution as a separate Mul and Add.
    Besides costing time, the pair gets its own quantize/dequantize steps in int8, which is what
    ruined MobileNet's int8 accuracy. The fold is exact up to float rounding.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}

    def const(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    removed: set[int] = set()
    folded = 0
    for conv in model.graph.node:
        if conv.op_type != "Conv" or conv.input[1] not in inits:
            continue
        mul = _single_consumer(consumers, conv.output[0], "Mul", outputs)
        add = _single_consumer(consumers, mul.output[0], "Add", outputs) if mul is not None else None
        if mul is None or add is None:
            continue
        weight = const(conv.input[1])
        scale, shift = const(mul.input[1]), const(add.input[1])
        channels = weight.shape[0]
        if scale is None or shift is None or scale.size != channels or shift.size != channels:
            continue
        bias = const(conv.input[2]) if len(conv.input) > 2 else np.zeros(channels, weight.dtype)
        new_weight = (weight * scale.reshape(channels, 1, 1, 1)).astype(weight.dtype)
        new_bias = (bias * scale.reshape(-1) + shift.reshape(-1)).astype(weight.dtype)
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array(new_weight, conv.input[1]))
        bias_name = f"{conv.input[1]}__folded_bias"
        model.graph.initializer.append(numpy_helper.from_array(new_bias, bias_name))
        del conv.input[2:]
        conv.input.append(bias_name)
        for node in consumers.get(add.output[0], []):  # rewire Add's readers to the Conv
            for i, name in enumerate(node.input):
                if name == add.output[0]:
                    node.input[i] = conv.output[0]
        removed |= {id(mul), id(add)}
        folded += 1
    kept = [n for n in model.graph.node if id(n) not in removed]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    if path is not None:
        onnx.save(model, str(path))
    return folded


def _single_consumer(
    consumers: dict[str, list[onnx.NodeProto]], tensor: str, op_type: str, outputs: set[str]
) -> onnx.NodeProto | None:
    readers = consumers.get(tensor, [])
    if len(readers) == 1 and readers[0].op_type == op_type and tensor not in outputs:
        return readers[0]
    return None


def check(path: Path) -> dict[str, int]:
    """onnx.checker full check; returns op counts so a slow, unfused graph is easy to spot."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    if batch.dim_value:  # a fixed batch would silently break batching in the service
        raise ValueError(f"{path} has a fixed batch dimension {batch.dim_value}")
    return dict(Counter(node.op_type for node in model.graph.node).most_common())


def io_names(path: Path) -> tuple[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return model.graph.input[0].name, model.graph.output[0].name


def count_flops(path: Path) -> int:
    """FLOPs (2 x multiply-adds) of Conv, MatMul and Gemm for one image, via shape inference.

    A convolution's last filters and input channels, when their weights are all zero, are not
    counted: they are the channels pad_depthwise_channels adds for onnxruntime's fast kernels,
    which compute nothing the model needs, so a model's FLOPs are the same with and without them."""
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    }
    inits = {t.name: t for t in model.graph.initializer}
    dequantized = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    macs = 0
    for node in inferred.graph.node:
        out = shapes.get(node.output[0])
        if node.op_type not in ("Conv", "MatMul", "Gemm") or not out or 0 in out:
            continue
        weight_name = dequantized.get(node.input[1], node.input[1])
        if node.op_type == "Conv" and weight_name in inits:
            macs += int(np.prod(out)) // out[1] * _live_conv_macs(numpy_helper.to_array(inits[weight_name]))
        elif node.op_type == "Conv" and (shape := shapes.get(node.input[1])):
            macs += int(np.prod(out)) * int(np.prod(shape[1:]))  # [M, C/group, kH, kW]
        elif node.op_type != "Conv":
            weight = list(inits[weight_name].dims) if weight_name in inits else shapes.get(node.input[1])
            if weight:
                macs += int(np.prod(out)) * int(weight[0])
    return 2 * macs


def _live_conv_macs(weight: np.ndarray) -> int:
    """Multiply-adds per output position of a convolution with this [M, C/group, kH, kW] weight,
    leaving out the trailing filters and input channels that are zero throughout (the padding)."""
    filters = np.any(weight != 0, axis=(1, 2, 3))
    inputs = np.any(weight != 0, axis=(0, 2, 3))
    return _up_to_last(filters) * _up_to_last(inputs) * int(np.prod(weight.shape[2:]))


def _up_to_last(live: np.ndarray) -> int:
    """How many entries up to and including the last True one."""
    nonzero = np.flatnonzero(live)
    return int(nonzero[-1]) + 1 if nonzero.size else 0
