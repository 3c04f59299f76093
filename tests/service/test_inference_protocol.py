"""The Open Inference Protocol v2 routes, called by real clients (Triton's tritonclient, KServe's
SDK) against a live server, and every error path answered in the protocol's shape."""

from __future__ import annotations

import base64
import contextlib
import json
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import BadRequest
from service.inference_protocol import HEADER_LENGTH, parse_request
from tests.service import images
from tests.support import ROOT, Server, run_server

tritonclient = pytest.importorskip("tritonclient.http")
KSERVE_PYTHON = ROOT / ".venv-kserve" / "bin" / "python"
PHOTOS = [images.jpeg(320, 240), images.jpeg(97, 131), images.encode(images.gradient(200, 90), "PNG")]


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> Iterator[object]:
    triton = tritonclient.InferenceServerClient(tiny_server.url.removeprefix("http://"))
    yield triton
    triton.close()


def classify(server: Server, model: str, photos: list[bytes], **params: str) -> list[dict[str, object]]:
    files = [("file", (f"{i}.img", p, "application/octet-stream")) for i, p in enumerate(photos)]
    response = httpx.post(f"{server.url}/classify", params={"model": model, **params}, files=files)
    assert response.status_code == 200, response.text
    results: list[dict[str, object]] = response.json()["results"]
    return results


def triton_infer(client: object, model: str, photos: list[bytes], binary: bool, **kwargs: object) -> object:
    image = tritonclient.InferInput("image", [len(photos)], "BYTES")
    # JSON cannot carry raw bytes: without binary data, each element is the base64 text.
    elements = photos if binary else [base64.b64encode(p).decode() for p in photos]
    image.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    outputs = [
        tritonclient.InferRequestedOutput("probabilities", binary_data=binary),
        tritonclient.InferRequestedOutput("label", binary_data=binary),
    ]
    return client.infer(model, [image], outputs=outputs, **kwargs)  # type: ignore[attr-defined]


def assert_same_as_classify(result: object, expected: list[dict[str, object]]) -> None:
    probabilities = result.as_numpy("probabilities")  # type: ignore[attr-defined]
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]  # type: ignore[attr-defined]
    assert labels == [e["label"] for e in expected]
    wanted = np.array([[e["probabilities"]["cat"], e["probabilities"]["dog"]] for e in expected])  # type: ignore[index]
    assert np.abs(probabilities - wanted).max() <= 1e-6


def test_server_and_model_metadata_and_readiness(client: object, tiny_server: Server) -> None:
    server = client.get_server_metadata()  # type: ignore[attr-defined]
    assert server["name"] == "catdog-serve" and "classification" in server["extensions"]
    models = httpx.get(f"{tiny_server.url}/models").json()
    fast_version = next(m["version"] for m in models["models"] if m["name"] == "fast")
    metadata = client.get_model_metadata("fast")  # type: ignore[attr-defined]
    assert metadata["versions"] == [fast_version]
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "label"]
    for name in ("fast", "slow", "auto", "cascade"):
        assert client.is_model_ready(name)  # type: ignore[attr-defined]
    assert client.is_model_ready("fast", model_version=fast_version)  # type: ignore[attr-defined]
    assert not client.is_model_ready("fast", model_version="0" * 12)  # type: ignore[attr-defined]
    assert client.get_model_metadata("cascade")["platform"] == "ensemble"  # type: ignore[attr-defined]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", ["fast", "slow"])
def test_tritonclient_gets_the_same_answers_as_classify(
    client: object, tiny_server: Server, model: str, binary: bool
) -> None:
    result = triton_infer(client, model, PHOTOS, binary, request_id="req-7")
    assert_same_as_classify(result, classify(tiny_server, model, PHOTOS))
    response = result.get_response()  # type: ignore[attr-defined]
    assert response["id"] == "req-7" and response["model_name"] == model
    assert response["parameters"]["answered_by"] == ",".join([model] * len(PHOTOS))


def test_versioned_route_and_a_wrong_version(client: object, tiny_server: Server) -> None:
    version = client.get_model_metadata("slow")["versions"][0]  # type: ignore[attr-defined]
    result = triton_infer(client, "slow", PHOTOS[:1], True, model_version=version)
    assert result.get_response()["model_version"] == version  # type: ignore[attr-defined]
    with pytest.raises(tritonclient.InferenceServerException) as wrong:
        triton_infer(client, "slow", PHOTOS[:1], True, model_version="ffffffffffff")
    assert wrong.value.status() == "404" and "not ffffffffffff" in wrong.value.message()


def test_classification_extension(client: object, tiny_server: Server) -> None:
    image = tritonclient.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(np.array(PHOTOS[:2], dtype=np.object_))
    for binary in (True, False):
        top = tritonclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=2)
        result = client.infer("fast", [image], outputs=[top])  # type: ignore[attr-defined]
        rows = result.as_numpy("probabilities")
        assert rows.shape == (2, 2)
        expected = classify(tiny_server, "fast", PHOTOS[:2])
        for row, want in zip(rows, expected, strict=True):
            first = (row[0].decode() if isinstance(row[0], bytes) else row[0]).split(":")
            assert first[2] == want["label"] and first[1] == str(["cat", "dog"].index(want["label"]))
            assert abs(float(first[0]) - want["confidence"]) <= 1e-6  # type: ignore[operator]


def test_auto_and_cascade_take_their_options_as_parameters(client: object, tiny_server: Server) -> None:
    auto = triton_infer(
        client, "auto", PHOTOS, True, parameters={"max_latency_ms": 1000.0, "min_accuracy": 0.5}
    )
    expected = classify(tiny_server, "auto", PHOTOS, max_latency_ms="1000", min_accuracy="0.5")
    assert_same_as_classify(auto, expected)
    assert auto.get_response()["parameters"]["mode"] == "auto"  # type: ignore[attr-defined]
    cascade = triton_infer(client, "cascade", PHOTOS, False, parameters={"min_confidence": 0.999999})
    assert_same_as_classify(cascade, classify(tiny_server, "cascade", PHOTOS, min_confidence="0.999999"))
    parameters = cascade.get_response()["parameters"]  # type: ignore[attr-defined]
    assert parameters["models_run"] == "fast,slow" and parameters["escalated"] == len(PHOTOS)


def test_raw_binary_request(tiny_server: Server) -> None:
    response = httpx.post(
        f"{tiny_server.url}/v2/models/fast/infer", content=PHOTOS[0], headers={HEADER_LENGTH: "0"}
    )
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["label"]["data"] == [classify(tiny_server, "fast", PHOTOS[:1])[0]["label"]]


def test_binary_output_for_every_output_by_request_parameter(tiny_server: Server) -> None:
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(PHOTOS[0]).decode()],
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    response = httpx.post(f"{tiny_server.url}/v2/models/fast/infer", json=body)
    assert response.status_code == 200, response.text
    size = int(response.headers[HEADER_LENGTH])
    header = json.loads(response.content[:size])
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sizes[0] == 8 and size + sum(sizes) == len(response.content)
    probabilities = np.frombuffer(response.content[size : size + 8], dtype="<f4")
    expected = classify(tiny_server, "fast", PHOTOS[:1])[0]["probabilities"]
    assert np.abs(probabilities - [expected["cat"], expected["dog"]]).max() <= 1e-6  # type: ignore[index]


@pytest.mark.skipif(not KSERVE_PYTHON.exists(), reason="the kserve venv is not built (make test builds it)")
def test_kserve_rest_client_gets_the_same_answers_as_classify(tiny_server: Server, tmp_path: Path) -> None:
    paths = []
    for i, photo in enumerate(PHOTOS):
        paths.append(tmp_path / f"{i}.img")
        paths[-1].write_bytes(photo)
    run = subprocess.run(
        [
            str(KSERVE_PYTHON),
            str(ROOT / "tests" / "clients" / "kserve_v2.py"),
            tiny_server.url,
            "slow",
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    answers = json.loads(run.stdout)
    expected = classify(tiny_server, "slow", PHOTOS)
    assert answers["ready"] is True
    for form in ("binary", "json"):
        assert answers[form]["id"] == form
        assert answers[form]["labels"] == [e["label"] for e in expected]
        wanted = np.array([[e["probabilities"]["cat"], e["probabilities"]["dog"]] for e in expected])  # type: ignore[index]
        assert np.abs(np.array(answers[form]["probabilities"]) - wanted).max() <= 1e-6


# -- error paths ----------------------------------------------------------------------------------


def tensor(data: list[object], shape: list[int] | None = None, datatype: str = "BYTES") -> dict[str, object]:
    return {"inputs": [{"name": "image", "shape": shape or [len(data)], "datatype": datatype, "data": data}]}


GOOD = base64.b64encode(PHOTOS[0]).decode()
ERROR_CASES: dict[str, tuple[str, dict[str, str | bytes], bytes, int, str]] = {
    "unknown model": (
        "/v2/models/nope/infer",
        {},
        json.dumps(tensor([GOOD])).encode(),
        404,
        "model_not_found",
    ),
    "unknown version": (
        "/v2/models/fast/versions/000000000000/infer",
        {},
        json.dumps(tensor([GOOD])).encode(),
        404,
        "model_not_found",
    ),
    "malformed json": ("/v2/models/fast/infer", {}, b'{"inputs": [', 400, "bad_request"),
    "no inputs": ("/v2/models/fast/infer", {}, b'{"inputs": []}', 400, "bad_request"),
    "wrong datatype": (
        "/v2/models/fast/infer",
        {},
        json.dumps(tensor([1, 2], datatype="FP32")).encode(),
        400,
        "bad_request",
    ),
    "shape and data disagree": (
        "/v2/models/fast/infer",
        {},
        json.dumps(tensor([GOOD], [3])).encode(),
        400,
        "bad_request",
    ),
    "too many images": (
        "/v2/models/fast/infer",
        {},
        json.dumps(tensor([GOOD] * 17)).encode(),
        400,
        "bad_request",
    ),
    "bad base64": (
        "/v2/models/fast/infer",
        {},
        json.dumps(tensor(["not base64!"])).encode(),
        400,
        "bad_request",
    ),
    "not an image": (
        "/v2/models/fast/infer",
        {},
        json.dumps(tensor([base64.b64encode(b"hello").decode()])).encode(),
        415,
        "invalid_image",
    ),
    "header length past the body": (
        "/v2/models/fast/infer",
        {HEADER_LENGTH: "5000"},
        b"{}",
        400,
        "bad_request",
    ),
    "header length not a number": ("/v2/models/fast/infer", {HEADER_LENGTH: "x"}, b"{}", 400, "bad_request"),
    # A superscript two: str.isdigit() says yes (headers are Latin-1), int() says no.
    "header length a superscript digit": (
        "/v2/models/fast/infer",
        {HEADER_LENGTH: b"\xb2"},
        b"{}",
        400,
        "bad_request",
    ),
    "binary size past the data": (
        "/v2/models/fast/infer",
        {HEADER_LENGTH: "97"},
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": 90},
                    }
                ]
            }
        )
        .encode()
        .ljust(97)
        + struct.pack("<I", 4)
        + b"abcd",
        400,
        "bad_request",
    ),
    "unknown output": (
        "/v2/models/fast/infer",
        {},
        json.dumps({**tensor([GOOD]), "outputs": [{"name": "logits"}]}).encode(),
        400,
        "bad_request",
    ),
    "bad timeout": (
        "/v2/models/fast/infer",
        {},
        json.dumps({**tensor([GOOD]), "parameters": {"timeout": -1}}).encode(),
        400,
        "bad_request",
    ),
    "cascade option on a plain model": (
        "/v2/models/fast/infer",
        {},
        json.dumps({**tensor([GOOD]), "parameters": {"min_confidence": 0.9}}).encode(),
        400,
        "bad_request",
    ),
    "compressed body": (
        "/v2/models/fast/infer",
        {"Content-Encoding": "gzip"},
        json.dumps(tensor([GOOD])).encode(),
        415,
        "unsupported_media_type",
    ),
    "unknown route": ("/v2/models/fast/explain", {}, b"{}", 404, "not_found"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_paths_answer_in_the_protocols_shape(tiny_server: Server, case: str) -> None:
    path, headers, body, status, code = ERROR_CASES[case]
    response = httpx.post(tiny_server.url + path, content=body, headers=headers)
    assert response.status_code == status, response.text
    payload = response.json()
    assert isinstance(payload["error"], str) and payload["error"]
    assert payload["code"] == code


def test_oversized_body_is_413_in_the_protocols_shape(tiny_models_dir: Path, tmp_path: Path) -> None:
    with run_server(tiny_models_dir, tmp_path, max_body_bytes="4096") as live:
        body = json.dumps(tensor([base64.b64encode(bytes(8000)).decode()])).encode()
        response = httpx.post(f"{live.url}/v2/models/fast/infer", content=body)
        assert response.status_code == 413
        assert response.json()["code"] == "payload_too_large" and isinstance(response.json()["error"], str)
        assert httpx.get(f"{live.url}/v2/health/ready").status_code == 200


def test_tritonclient_sees_the_error_message(client: object) -> None:
    with pytest.raises(tritonclient.InferenceServerException) as unknown:
        triton_infer(client, "nope", PHOTOS[:1], True)
    assert unknown.value.status() == "404" and "fast" in unknown.value.message()


@pytest.mark.parametrize(
    "body, header, message",
    [
        (b"\x00\x00", "0", None),  # a raw binary request parses; the image is checked later (415)
        (b"", "0", "empty body"),
        (
            b'{"inputs": [{"name": "i", "shape": [2], "datatype": "BYTES", "data": [["YQ=="], ["YQ=="]]}]}',
            None,
            None,
        ),
        (
            b'{"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": ["YQ=="], '
            b'"parameters": {"content_type": "str"}}]}',
            None,
            "base64",
        ),
        (b'{"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES"}]}', None, "neither data"),
        (
            b'{"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": [5]}]}',
            None,
            "not a base64",
        ),
    ],
)
def test_request_parsing(body: bytes, header: str | None, message: str | None) -> None:
    if message is None:
        assert parse_request(body, header, 16).images
        return
    with pytest.raises(BadRequest, match=message):
        parse_request(body, header, 16)


def test_binary_elements_must_fit_their_lengths() -> None:
    header = json.dumps(
        {"inputs": [{"name": "i", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 11}}]}
    ).encode()
    two = struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"c"
    assert parse_request(header + two, str(len(header)), 16).images == [b"ab", b"c"]
    truncated = struct.pack("<I", 9) + b"abcdefg"
    with pytest.raises(BadRequest, match="runs past"):
        parse_request(header + truncated, str(len(header)), 16)
    with pytest.raises(BadRequest, match="follow the inputs"):
        parse_request(header + two + b"extra", str(len(header)), 16)


def test_openapi_documents_the_v2_routes(tiny_server: Server) -> None:
    # schemathesis (test_schemathesis.py) fuzzes what this document lists, the v2 routes included.
    spec = httpx.get(f"{tiny_server.url}/openapi.json").json()
    assert {"/v2", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/ready"} <= set(
        spec["paths"]
    )
    body = spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"].removeprefix("#/components/schemas/") in spec["components"]["schemas"]
    assert "RequestInput" in spec["components"]["schemas"]


# Requests shaped like the protocol's, with every field free to be wrong: whatever a client sends,
# parsing returns images or raises BadRequest (400), never anything that would be a 500.
_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
_json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_shapes = st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=4) | _json_values
_tensors = st.fixed_dictionaries(
    {},
    optional={
        "name": st.just("image") | _json_values,
        "shape": _shapes,
        "datatype": st.sampled_from(["BYTES", "FP32", "UINT8"]) | _json_values,
        "data": st.lists(st.just("YQ==") | _json_values, max_size=4) | _json_values,
        "parameters": st.fixed_dictionaries(
            {},
            optional={
                "binary_data_size": st.integers(min_value=-5, max_value=2**40) | _json_values,
                "content_type": st.just("base64") | _json_values,
            },
        )
        | _json_values,
    },
)
_requests = st.fixed_dictionaries(
    {"inputs": st.lists(_tensors, max_size=2) | _json_values},
    optional={
        "id": _json_values,
        "parameters": st.dictionaries(
            st.sampled_from(["timeout", "max_latency_ms", "min_accuracy", "cascade", "min_confidence"]),
            _json_values,
        )
        | _json_values,
        "outputs": st.lists(st.fixed_dictionaries({"name": _json_values}), max_size=2) | _json_values,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    request=_requests,
    binary=st.binary(max_size=24),
    # Headers arrive as Latin-1 text: digits, near-digits (superscripts, signs) and anything else.
    header_length=st.none()
    | st.text(alphabet="0123456789\xb2\xb3\xb9+- ", min_size=1, max_size=4)
    | st.text(alphabet=st.characters(max_codepoint=255), max_size=4),
    use_json_length=st.booleans(),
)
def test_any_request_parses_or_is_a_400(
    request: object, binary: bytes, header_length: str | None, use_json_length: bool
) -> None:
    header = json.dumps(request).encode()
    if use_json_length:
        header_length = str(len(header))
    with contextlib.suppress(BadRequest):
        parse_request(header + binary, header_length, 16)
