"""The Open Inference Protocol v2 (KServe v2, Triton) over REST: request parsing and response
encoding. No web framework here; service/v2_routes.py does the HTTP.

Images arrive as one BYTES input, each element an encoded image (JPEG, PNG, ...), in any of the
protocol's three body layouts:
- JSON, elements as base64 strings (`parameters.content_type: "base64"`, or bare strings: an image
  cannot be UTF-8 text, so a string is always read as base64);
- JSON followed by binary tensor data (header `Inference-Header-Content-Length`: the JSON's size),
  each element a 4-byte little-endian length and its bytes;
- a raw binary request (`Inference-Header-Content-Length: 0`): the body is one encoded image.

Answers are `probabilities` (FP32 [N, labels]) and `label` (BYTES [N]), as JSON or binary, with
the classification extension (`"0.973000:1:dog"`, Triton's format) on `probabilities`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, WithJsonSchema

from service.errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT_NAME = "image"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_LABEL = "label"
OUTPUT_NAMES = (OUTPUT_PROBABILITIES, OUTPUT_LABEL)
EXTENSIONS = ["binary_tensor_data", "classification"]
_LENGTH_PREFIX = struct.Struct("<I")

ParameterValue = StrictBool | StrictInt | float | str
# The documented forms are the plain ones (the protocol's parameter values; base64 elements), so
# OpenAPI tools generate from them; validation still takes nested data, as the protocol allows.
_PARAMETERS_SCHEMA = {"type": "object", "additionalProperties": {"type": ["boolean", "number", "string"]}}
_DATA_SCHEMA = {
    "type": "array",
    "items": {"type": "string", "format": "byte"},
    "description": "The encoded images, base64; or nested by shape.",
}
Parameters = dict[str, ParameterValue]
DocumentedParameters = Annotated[Parameters | None, WithJsonSchema(_PARAMETERS_SCHEMA)]


class _Tolerant(BaseModel):
    # Clients add fields of their own (Triton's shared-memory keys, KServe's extras): ignored.
    model_config = ConfigDict(extra="ignore")


class RequestInput(_Tolerant):
    name: str = Field(max_length=256)
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=8)
    datatype: str = Field(max_length=16)
    parameters: DocumentedParameters = None
    data: Annotated[list[Any] | None, WithJsonSchema(_DATA_SCHEMA)] = None


class RequestOutput(_Tolerant):
    name: str = Field(max_length=256)
    parameters: DocumentedParameters = None


class InferenceRequest(_Tolerant):
    """The JSON part of an inference request."""

    id: str | None = Field(None, max_length=256)
    parameters: DocumentedParameters = None
    inputs: list[RequestInput] = Field(min_length=1, max_length=8)
    outputs: list[RequestOutput] | None = Field(None, max_length=8)


class RequestOptions(_Tolerant):
    """The request `parameters` this server reads; the rest (priority, sequence ids) are ignored."""

    timeout: StrictInt | None = Field(None, gt=0, le=3_600_000_000, description="Deadline in microseconds.")
    max_latency_ms: float | None = Field(None, gt=0, le=3_600_000)
    min_accuracy: float | None = Field(None, ge=0, le=1)
    cascade: str | None = Field(None, max_length=130)
    min_confidence: float | None = Field(None, ge=0, le=1)
    binary_data_output: StrictBool = False


class OutputOptions(_Tolerant):
    binary_data: StrictBool | None = None
    classification: StrictInt | None = Field(None, ge=1)


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    ready: bool


class ProtocolError(BaseModel):
    """Every error on the /v2 routes: the protocol's shape, plus this server's stable code."""

    error: str
    code: str


@dataclass(frozen=True)
class ParsedRequest:
    id: str | None
    images: list[bytes]
    options: RequestOptions
    outputs: list[RequestOutput] | None


def model_metadata(name: str, versions: list[str], platform: str, n_labels: int) -> ModelMetadata:
    return ModelMetadata(
        name=name,
        versions=versions,
        platform=platform,
        inputs=[TensorMetadata(name=INPUT_NAME, datatype="BYTES", shape=[-1])],
        outputs=[
            TensorMetadata(name=OUTPUT_PROBABILITIES, datatype="FP32", shape=[-1, n_labels]),
            TensorMetadata(name=OUTPUT_LABEL, datatype="BYTES", shape=[-1]),
        ],
    )


# -- requests -------------------------------------------------------------------------------------


def parse_request(body: bytes, header_length: str | None, max_images: int) -> ParsedRequest:
    """The images and options of one inference request; BadRequest (400) for anything malformed."""
    if header_length is None:
        return _parse_json_request(body, memoryview(b""), max_images)
    if not (header_length.isascii() and header_length.isdigit()):  # '²' is a digit to isdigit()
        raise BadRequest(f"{HEADER_LENGTH} must be a number of bytes, not {header_length[:32]!r}")
    json_size = int(header_length)
    if json_size > len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {json_size}, past the end of the {len(body)}-byte body")
    if json_size == 0:  # the raw binary request: the whole body is one encoded image
        if not body:
            raise BadRequest("the raw binary request has an empty body; send one encoded image")
        return ParsedRequest(None, [body], RequestOptions(), None)
    # The binary part as a view, not a slice: it is copied once, into each image's own bytes.
    header = body if json_size == len(body) else body[:json_size]
    return _parse_json_request(header, memoryview(body)[json_size:], max_images)


def _parse_json_request(header: bytes, binary: memoryview, max_images: int) -> ParsedRequest:
    try:
        request = InferenceRequest.model_validate_json(header)
        options = RequestOptions.model_validate(request.parameters or {})
    except ValidationError as exc:
        raise BadRequest(f"malformed inference request: {_summary(exc)}") from None
    if len(request.inputs) != 1:
        raise BadRequest(
            f"{len(request.inputs)} inputs sent; this server takes one, the encoded images "
            f"({INPUT_NAME!r}, BYTES)"
        )
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise BadRequest(
            f"input {tensor.name!r} has datatype {tensor.datatype}; send the encoded images as BYTES"
        )
    count = math.prod(tensor.shape)
    if not 1 <= count <= max_images:
        raise BadRequest(f"input shape {tensor.shape} holds {count} images; send 1 to {max_images}")
    images, used = _images_of(tensor, binary)
    if len(images) != count:
        raise BadRequest(f"input shape {tensor.shape} says {count} images, the data holds {len(images)}")
    if used != len(binary):
        raise BadRequest(f"{len(binary) - used} bytes of binary data follow the inputs; no input names them")
    for output in request.outputs or []:
        if output.name not in OUTPUT_NAMES:
            raise BadRequest(f"unknown output {output.name!r}; outputs are {', '.join(OUTPUT_NAMES)}")
    return ParsedRequest(request.id, images, options, request.outputs)


def _images_of(tensor: RequestInput, binary: memoryview) -> tuple[list[bytes], int]:
    """The elements of the BYTES input, and how many bytes of the binary section they used."""
    params = tensor.parameters or {}
    size = params.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest(f"input {tensor.name!r}: binary_data_size must be a whole number of bytes")
        if tensor.data is not None:
            raise BadRequest(f"input {tensor.name!r} has both binary_data_size and JSON data")
        if size > len(binary):
            raise BadRequest(
                f"input {tensor.name!r}: binary_data_size {size} is past the {len(binary)} bytes "
                "of binary data"
            )
        return list(_length_prefixed(binary[:size], tensor.name)), size
    content_type = params.get("content_type", "base64")
    if content_type != "base64":
        raise BadRequest(f"input {tensor.name!r}: content_type {content_type!r}; images are sent as base64")
    if tensor.data is None:
        raise BadRequest(f"input {tensor.name!r} has neither data nor binary_data_size")
    return [_base64(element, tensor.name, i) for i, element in enumerate(_flat(tensor.data))], 0


def _length_prefixed(data: memoryview, name: str) -> Iterator[bytes]:
    position = 0
    while position < len(data):
        if position + _LENGTH_PREFIX.size > len(data):
            raise BadRequest(f"input {name!r}: binary data ends inside an element's 4-byte length")
        (length,) = _LENGTH_PREFIX.unpack_from(data, position)
        position += _LENGTH_PREFIX.size
        if position + length > len(data):
            raise BadRequest(f"input {name!r}: an element of {length} bytes runs past the binary data")
        yield bytes(data[position : position + length])
        position += length


def _flat(data: list[Any]) -> Iterator[Any]:
    # The protocol allows tensor data flattened or nested by shape: walk nested lists in order.
    for element in data:
        if isinstance(element, list):
            yield from _flat(element)
        else:
            yield element


def _base64(element: Any, name: str, index: int) -> bytes:
    if not isinstance(element, str):
        raise BadRequest(f"input {name!r} element {index} is {type(element).__name__}, not a base64 string")
    try:
        return base64.b64decode(element, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"input {name!r} element {index} is not valid base64") from None


def _summary(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]]
    return "; ".join(parts)


# -- responses ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    probabilities: np.ndarray  # [N, labels] float32, columns in `labels` order
    labels: list[str]  # the predicted label per image
    label_names: list[str]


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    parameters: Parameters,
    outputs: Outputs,
    requested: list[RequestOutput] | None,
    binary_by_default: bool,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON part's size when binary output data follows it."""
    wanted = requested or [RequestOutput(name=name) for name in OUTPUT_NAMES]
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output in wanted:
        options = _output_options(output)
        datatype, shape, values = _tensor(output.name, options.classification, outputs)
        tensor: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": shape}
        if options.binary_data if options.binary_data is not None else binary_by_default:
            raw = _binary(datatype, values)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = values.reshape(-1).tolist() if isinstance(values, np.ndarray) else values
        tensors.append(tensor)
    body: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        body["id"] = request_id
    body["parameters"] = parameters
    body["outputs"] = tensors
    header = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def _output_options(output: RequestOutput) -> OutputOptions:
    try:
        return OutputOptions.model_validate(output.parameters or {})
    except ValidationError as exc:
        raise BadRequest(f"output {output.name!r}: {_summary(exc)}") from None


def _tensor(
    name: str, classification: int | None, outputs: Outputs
) -> tuple[str, list[int], np.ndarray | list[str]]:
    n = len(outputs.labels)
    if classification is None:
        if name == OUTPUT_PROBABILITIES:
            return "FP32", [n, len(outputs.label_names)], outputs.probabilities
        return "BYTES", [n], list(outputs.labels)
    if name != OUTPUT_PROBABILITIES:
        raise BadRequest(f"classification applies to {OUTPUT_PROBABILITIES!r}, not {name!r}")
    if classification > len(outputs.label_names):
        raise BadRequest(
            f"classification {classification} asks for more classes than the {len(outputs.label_names)} "
            "there are"
        )
    return "BYTES", [n, classification], _top_classes(outputs, classification)


def _top_classes(outputs: Outputs, k: int) -> list[str]:
    """Triton's classification strings, "value:index:label", best first, row by row."""
    strings = []
    for row in outputs.probabilities:
        for index in np.argsort(-row, kind="stable")[:k]:
            strings.append(f"{float(row[index]):.6f}:{int(index)}:{outputs.label_names[index]}")
    return strings


def _binary(datatype: str, values: np.ndarray | list[str]) -> bytes:
    if datatype == "FP32":
        assert isinstance(values, np.ndarray)
        return values.astype("<f4").tobytes()
    encoded = [str(v).encode() for v in values]
    return b"".join(_LENGTH_PREFIX.pack(len(e)) + e for e in encoded)
