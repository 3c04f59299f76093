"""Widen channel counts that onnxruntime's fast int8 depthwise kernel cannot take, at export.

onnxruntime runs an int8 depthwise convolution on its symmetric kernels (MLAS ConvSym: AVX2,
AVX-VNNI, AVX-512 VNNI) only when the channel count is a multiple of 16; any other count falls back
to a generic kernel. Xception's middle flow runs at 728 channels (27 of its 34 depthwise
convolutions): on the 2-CPU Xeon VM one 19x19x728 int8 depthwise convolution took 812 us, one of
736 channels 461 us, and fp32 483 us (1 thread, a quantize and dequantize around each;
docs/models.md, "int8 on different CPUs"). So the export widens such a channel stream to the next
multiple of 16 with channels that are zero everywhere: the convolutions that produce the stream get
filters of zeros (and zero biases), the depthwise ones zero kernels, and the convolutions that read
it zero weights for the new channels. ReLU, ReLU6, max pooling and sums keep zeros zero, so the
model computes exactly what it did, on wider tensors (fp32 a little faster too: its kernels block
channels by 16). A stream that reaches any other operator, or a graph input or output, is left as
it is; the widening is recorded in the model's metadata, so that what measures activations
(the int8 calibration) can undo it.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger(__name__)

FAST_DEPTHWISE_MULTIPLE = 16
WIDENED_KEY = "catdog.widened_depthwise"  # metadata: {first depthwise node: its channels before}


def group_count(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def is_depthwise(node: onnx.NodeProto) -> bool:
    """A convolution with one group per channel (a depth multiplier of 1 is checked by _Graph)."""
    return node.op_type == "Conv" and group_count(node) > 1


@dataclass
class _Stream:
    """Tensors that carry the same channels, and the convolutions at its edges."""

    tensors: set[str] = field(default_factory=set)
    producers: set[str] = field(default_factory=set)  # convolutions that write it: more filters
    depthwise: set[str] = field(default_factory=set)  # read and write it: more groups
    readers: set[str] = field(default_factory=set)  # convolutions that read it: more input channels
    weights: dict[str, list[onnx.TensorProto]] = field(default_factory=dict)  # each edge's, checked


class _Graph:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.nodes = {node.name: node for node in graph.node}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.readers[name].append(node)
        self.initializers = {init.name: init for init in graph.initializer}
        self.boundary = {v.name for v in graph.input} | {v.name for v in graph.output}

    def trace(self, start: str) -> _Stream | None:
        """The stream `start` belongs to, or None when it reaches an operator it cannot widen."""
        stream = _Stream()
        pending = [start]
        while pending:
            tensor = pending.pop()
            if tensor in stream.tensors:
                continue
            if tensor in self.boundary or tensor in self.initializers or tensor not in self.producer:
                return None
            stream.tensors.add(tensor)
            producer = self.producer[tensor]
            if producer.op_type == "Conv" and not is_depthwise(producer):
                stream.producers.add(producer.name)
            elif is_depthwise(producer):
                weight = self.initializers.get(producer.input[1])
                if weight is None or weight.dims[0] != group_count(producer):
                    return None  # computed weights, or a depth multiplier above 1
                stream.depthwise.add(producer.name)
                pending.append(producer.input[0])
            elif (inputs := self._stream_inputs(producer)) is not None:
                pending.extend(inputs)
            else:
                return None
            for reader in self.readers[tensor]:
                if reader.op_type == "Conv" and reader.input[0] == tensor:
                    if is_depthwise(reader):
                        pending.extend(reader.output)
                    else:
                        stream.readers.add(reader.name)
                elif (inputs := self._stream_inputs(reader)) is not None and tensor in inputs:
                    pending.extend([*inputs, *reader.output])
                else:
                    return None
        for name in stream.producers | stream.depthwise | stream.readers:
            weights = self.weights(name)
            if weights is None:
                return None
            stream.weights[name] = weights
        return stream

    def _stream_inputs(self, node: onnx.NodeProto) -> list[str] | None:
        """The inputs of an operator that maps each channel to the same channel and keeps a zero
        channel zero (ReLU, ReLU6 as Clip, max pooling, sums of two streams), or None."""
        if node.op_type in ("Relu", "MaxPool") and len(node.output) == 1:
            return [node.input[0]]
        if node.op_type == "Add":
            return list(node.input)
        if node.op_type == "Clip" and self._keeps_zero(node.input[1:]):
            return [node.input[0]]
        return None

    def _keeps_zero(self, bounds: Sequence[str]) -> bool:
        """Clip's min and max: absent, or scalar constants with min <= 0 <= max."""
        low, high = [*bounds, "", ""][:2]
        return self._bound(low, -math.inf) <= 0 <= self._bound(high, math.inf)

    def _bound(self, name: str, absent: float) -> float:
        """A scalar constant input's value, `absent` for no input, nan for anything else."""
        if not name:
            return absent
        tensor = self.initializers.get(name)
        if tensor is None or int(np.prod(tensor.dims)) != 1:
            return math.nan
        return float(numpy_helper.to_array(tensor).reshape(()))

    def weights(self, node_name: str) -> list[onnx.TensorProto] | None:
        """A convolution's weight and bias initializers, if each is used by this node alone (None
        otherwise: widening a shared or computed weight would change another node too)."""
        node = self.nodes[node_name]
        found = [self.initializers[name] for name in node.input[1:] if name in self.initializers]
        if len(found) != len(node.input) - 1 or any(len(self.readers[t.name]) != 1 for t in found):
            return None
        return found


def _resized(tensor: onnx.TensorProto, axis: int, size: int) -> onnx.TensorProto:
    """The tensor with `size` entries along `axis`: zeros appended, or the last entries cut off."""
    array = numpy_helper.to_array(tensor)
    if size <= array.shape[axis]:
        return numpy_helper.from_array(np.take(array, np.arange(size), axis=axis), tensor.name)
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, size - array.shape[axis])
    return numpy_helper.from_array(np.pad(array, widths), tensor.name)


def _resize(view: _Graph, stream: _Stream, channels: int) -> None:
    """Give a stream `channels` channels: the new ones zero throughout, or the last ones removed
    (the weights are the graph's own initializers, changed in place)."""
    for name in stream.producers | stream.depthwise:
        for tensor in stream.weights[name]:  # filters (axis 0) and biases
            tensor.CopyFrom(_resized(tensor, 0, channels))
    for name in stream.depthwise:
        for attribute in view.nodes[name].attribute:
            if attribute.name == "group":
                attribute.i = channels
    for name in stream.readers:
        weight = stream.weights[name][0]
        weight.CopyFrom(_resized(weight, 1, channels))  # input channels (axis 1)


def _record(model: onnx.ModelProto) -> dict[str, int]:
    entry = next((p for p in model.metadata_props if p.key == WIDENED_KEY), None)
    return dict(json.loads(entry.value)) if entry is not None else {}


def _set_record(model: onnx.ModelProto, record: dict[str, int]) -> None:
    kept = [p for p in model.metadata_props if p.key != WIDENED_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if record:
        model.metadata_props.add(key=WIDENED_KEY, value=json.dumps(record, sort_keys=True))


def pad_depthwise_channels(model: onnx.ModelProto, multiple: int = FAST_DEPTHWISE_MULTIPLE) -> int:
    """Widen, in place, every channel stream whose depthwise convolutions have a channel count
    that is not a multiple of `multiple`; return how many depthwise convolutions were widened.
    The model's metadata records each stream's channel count before (narrow_depthwise_channels)."""
    graph = model.graph
    view = _Graph(graph)
    widened: set[str] = set()
    record = _record(model)
    for node in list(graph.node):
        channels = group_count(node)
        if not is_depthwise(node) or channels % multiple == 0:  # widened ones are multiples now
            continue
        stream = view.trace(node.input[0])
        if stream is None:
            log.info(
                "%s: %d channels left as they are (the stream reaches another operator)", node.name, channels
            )
            continue
        _resize(view, stream, channels - channels % -multiple)
        widened |= stream.depthwise
        record[node.name] = channels
        log.info(
            "%s and %d more depthwise convolutions: %d -> %d channels",
            node.name,
            len(stream.depthwise) - 1,
            channels,
            group_count(node),
        )
    _set_record(model, record)
    # Shapes recorded for the widened tensors no longer hold: let shape inference redo them all.
    del graph.value_info[:]
    return len(widened)


def narrow_depthwise_channels(model: onnx.ModelProto) -> int:
    """Undo pad_depthwise_channels, in place, from the record in the model's metadata; return how
    many streams were narrowed. What measures the model's activations (the int8 calibration's
    percentiles) should not see the zero channels: 8 of 736 moved some ranges by up to 1.4 %."""
    record = _record(model)
    view = _Graph(model.graph)
    for name, channels in record.items():
        stream = view.trace(view.nodes[name].input[0])
        if stream is None:
            raise ValueError(f"{name}: the widened stream recorded in the metadata is not in the graph")
        _resize(view, stream, channels)
    _set_record(model, {})
    del model.graph.value_info[:]
    return len(record)
