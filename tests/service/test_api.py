"""The HTTP contract, against a real uvicorn process serving tiny models."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.service import images
from tests.support import Server, run_server

MAX_BODY = 2_000_000


@pytest.fixture(scope="module")
def server(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(
        tiny_models_dir, tmp_path_factory.mktemp("api"), max_body_bytes=str(MAX_BODY), max_files="4"
    ) as live:
        yield live


def post_files(server: Server, blobs: list[bytes], **params: str) -> httpx.Response:
    files = [("file", (f"img{i}.jpg", blob, "image/jpeg")) for i, blob in enumerate(blobs)]
    return httpx.post(f"{server.url}/classify", params=params, files=files, timeout=30)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    if code:
        assert body["error"]["code"] == code


def test_multipart_single_image(server: Server) -> None:
    response = post_files(server, [images.jpeg()], model="fast")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "fast" and len(body["results"]) == 1
    result = body["results"][0]
    assert result["label"] in ("cat", "dog")
    assert abs(sum(result["probabilities"].values()) - 1) < 1e-6
    assert result["confidence"] == max(result["probabilities"].values())
    assert set(body["timings_ms"]) == {"decode", "queue", "inference", "total"}
    assert response.headers["X-Request-ID"] == body["request_id"]


def test_batch_results_keep_upload_order(server: Server) -> None:
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (128, 128, 128)]
    blobs = [images.encode(Image.new("RGB", (40, 40), c), "PNG") for c in colours]
    alone = [
        post_files(server, [b], model="fast").json()["results"][0]["probabilities"]["cat"] for b in blobs
    ]
    together = [r["probabilities"]["cat"] for r in post_files(server, blobs, model="fast").json()["results"]]
    assert len(set(np.round(alone, 3))) == len(colours)  # the images really are told apart
    assert together == pytest.approx(alone, abs=1e-6)


@pytest.mark.parametrize("media_type", ["image/jpeg", "image/png", "application/octet-stream"])
def test_raw_body(server: Server, media_type: str) -> None:
    blob = images.valid_corpus()["png" if media_type == "image/png" else "jpeg"]
    response = httpx.post(
        f"{server.url}/classify?model=slow&top=1",
        content=blob,
        headers={"Content-Type": media_type},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["top"] == [{"label": result["label"], "probability": result["confidence"]}]


def test_every_valid_format_is_classified(server: Server) -> None:
    for name, blob in images.valid_corpus().items():
        response = post_files(server, [blob])
        assert response.status_code == 200, f"{name}: {response.text}"


def test_incoming_request_id_is_echoed(server: Server) -> None:
    response = httpx.post(
        f"{server.url}/classify",
        content=images.jpeg(),
        headers={"Content-Type": "image/jpeg", "X-Request-ID": "trace-42"},
    )
    assert response.headers["X-Request-ID"] == "trace-42"
    assert response.json()["request_id"] == "trace-42"


@pytest.mark.parametrize(
    "name",
    [
        "nope",
        "../../etc/passwd",
        "/etc/passwd",
        "fast/../slow",
        "..%2F..",
        "C:\\models\\fast",
        "fast\x00",
        "FAST",
        "x" * 64,
    ],
)
def test_unknown_model_is_404_listing_valid_names(server: Server, name: str) -> None:
    response = post_files(server, [images.jpeg()], model=name)
    assert_error(response, 404, "model_not_found")
    message = response.json()["error"]["message"]
    assert "fast" in message and "slow" in message
    assert "/" not in message and "\\" not in message  # never a path


def test_model_listing(server: Server) -> None:
    listing = httpx.get(f"{server.url}/models").json()
    assert listing["default"] == "fast"
    assert {m["name"] for m in listing["models"]} == {"fast", "slow"}
    cascade = listing["cascades"][0]
    assert (cascade["small"], cascade["threshold"], cascade["compute_budget"]) == ("fast", 0.9, 0.25)
    assert cascade["rule_threshold"] == 0.8
    one = httpx.get(f"{server.url}/models/slow").json()
    assert (one["input_width"], one["input_height"]) == (48, 48) and one["device"] == "cpu"
    assert one["provider"] == "CPUExecutionProvider"
    assert_error(httpx.get(f"{server.url}/models/../etc"), 404)


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/v2/health/live", "/v2/health/ready"])
def test_health_routes(server: Server, path: str) -> None:
    assert httpx.get(server.url + path).status_code == 200


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b"\xff" * min(size, total - sent)
        sent += size


def hostile_requests(server: Server) -> dict[str, tuple[int | tuple[int, ...], httpx.Request]]:
    """(expected status, request) for each attack on the HTTP layer itself."""
    url = f"{server.url}/classify"
    jpeg = images.jpeg()
    r = httpx.Request
    return {
        "no content type": (415, r("POST", url, content=jpeg)),
        "text content type": (415, r("POST", url, content=jpeg, headers={"Content-Type": "text/plain"})),
        "multipart without file field": (400, r("POST", url, files={"other": ("a.jpg", jpeg)})),
        "multipart with a plain field named file": (
            400,
            r("POST", url, data={"file": "not a file"}, files={"other": ("a.jpg", jpeg)}),
        ),
        "urlencoded form": (415, r("POST", url, data={"file": "not a file"})),
        "multipart, too many files": (400, r("POST", url, files=[("file", ("a.jpg", jpeg))] * 5)),
        "broken multipart boundary": (
            400,
            r(
                "POST",
                url,
                content=b"--x\r\nbroken",
                headers={"Content-Type": "multipart/form-data; boundary=y"},
            ),
        ),
        "multipart without boundary": (
            400,
            r("POST", url, content=b"abc", headers={"Content-Type": "multipart/form-data"}),
        ),
        "declared body over the cap": (
            413,
            r("POST", url, content=b"\xff" * (MAX_BODY + 1), headers={"Content-Type": "image/jpeg"}),
        ),
        "chunked body over the cap": (
            413,
            r("POST", url, content=chunks(MAX_BODY * 3), headers={"Content-Type": "image/jpeg"}),
        ),
        "negative top": (
            422,
            r("POST", url + "?top=-1", content=jpeg, headers={"Content-Type": "image/jpeg"}),
        ),
        "top not a number": (
            422,
            r("POST", url + "?top=abc", content=jpeg, headers={"Content-Type": "image/jpeg"}),
        ),
        "model name too long": (
            422,
            r("POST", url + "?model=" + "m" * 500, content=jpeg, headers={"Content-Type": "image/jpeg"}),
        ),
        "deadline header not a number": (
            400,
            r("POST", url, content=jpeg, headers={"Content-Type": "image/jpeg", "X-Deadline-Ms": "soon"}),
        ),
        "negative deadline": (
            400,
            r("POST", url, content=jpeg, headers={"Content-Type": "image/jpeg", "X-Deadline-Ms": "-5"}),
        ),
        "timeout_ms zero": (
            422,
            r("POST", url + "?timeout_ms=0", content=jpeg, headers={"Content-Type": "image/jpeg"}),
        ),
        "GET on classify": (405, r("GET", url)),
        "unknown route": (404, r("GET", f"{server.url}/admin")),
    }


def test_hostile_corpus_gets_clear_4xx_and_server_stays_healthy(server: Server) -> None:
    outcomes: dict[str, int] = {}
    with httpx.Client(timeout=30) as client:
        for name, make in images.HOSTILE.items():
            for style in ("raw", "multipart"):
                if style == "raw":
                    response = client.post(
                        f"{server.url}/classify", content=make(), headers={"Content-Type": "image/png"}
                    )
                else:
                    response = client.post(f"{server.url}/classify", files={"file": ("x", make())})
                outcomes[f"{name} ({style})"] = response.status_code
                assert response.status_code in (413, 415), f"{name} {style}: {response.text}"
                assert_error(response, response.status_code)
        for name, (expected, request) in hostile_requests(server).items():
            try:
                response = client.send(request)
            except httpx.TransportError:
                # A server may close the socket on an oversized chunked upload after answering.
                assert name == "chunked body over the cap", name
                continue
            outcomes[name] = response.status_code
            allowed = expected if isinstance(expected, tuple) else (expected,)
            assert response.status_code in allowed, f"{name}: {response.status_code} {response.text}"
            assert_error(response, response.status_code)
    assert len(outcomes) >= 30
    assert max(outcomes.values()) < 500
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert post_files(server, [images.jpeg()]).status_code == 200
    assert server.process.poll() is None


def test_metrics_after_traffic(server: Server) -> None:
    for _ in range(3):
        post_files(server, [images.jpeg()], model="slow")
    post_files(server, [b"garbage"], model="slow")
    text = httpx.get(f"{server.url}/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert (
        samples[("catdog_requests_total", (("model", "slow"), ("outcome", "ok"), ("status_class", "2xx")))]
        >= 3
    )
    assert (
        samples[
            (
                "catdog_requests_total",
                (("model", "slow"), ("outcome", "invalid_image"), ("status_class", "4xx")),
            )
        ]
        >= 1
    )
    assert samples[("catdog_inference_seconds_count", (("model", "slow"),))] >= 3
    assert samples[("catdog_batch_size_count", (("model", "slow"),))] >= 3
    assert samples[("catdog_ready", ())] == 1
    info = [k for k in samples if k[0] == "catdog_model_info"]
    assert {dict(k[1])["model"] for k in info} == {"fast", "slow"}
    # Client-supplied names never become label values.
    assert not any("passwd" in str(k) for k in samples)


def test_openapi_documents_raw_and_multipart_bodies(server: Server) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    content = spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/jpeg", "image/png"} <= set(content)
    assert {"413", "415", "503", "504"} <= set(spec["paths"]["/classify"]["post"]["responses"])


async def _burst(url: str, n: int, **params: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        blob = images.jpeg()
        return await asyncio.gather(
            *(
                client.post(
                    f"{url}/classify", params=params, content=blob, headers={"Content-Type": "image/jpeg"}
                )
                for _ in range(n)
            )
        )


def test_full_queue_answers_503_with_retry_after(tiny_models_dir: Path, tmp_path: Path) -> None:
    with run_server(tiny_models_dir, tmp_path, queue_size="4", max_batch_size="2", max_files="4") as live:
        responses = asyncio.run(_burst(live.url, 40, model="slow"))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}
        rejected = [r for r in responses if r.status_code == 503]
        assert rejected and statuses.count(200) >= 4
        for response in rejected:
            assert_error(response, 503, "overloaded")
            assert int(response.headers["Retry-After"]) >= 1
        assert httpx.get(f"{live.url}/readyz").status_code == 200


def test_deadline_that_cannot_be_met_is_504(server: Server) -> None:
    responses = asyncio.run(_burst(server.url, 6, model="slow", timeout_ms="1"))
    assert {r.status_code for r in responses} == {504}
    assert_error(responses[0], 504, "deadline_exceeded")


def test_oversized_chunked_upload_is_answered_and_the_connection_closed(server: Server) -> None:
    """A 413 mid-stream must end the connection: keeping it open lets the client stream on while
    the server reads and discards (it read 4.3 GiB in 8 s before this was fixed)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"\xff" * 65536
        for _ in range(MAX_BODY // len(chunk) + 2):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head = received.split(b"\r\n\r\n")[0].decode().lower()
        assert head.startswith("http/1.1 413") and "connection: close" in head, head
        # The server closes its side: recv returns b"" (EOF) instead of waiting for more body.
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(65536):
                pass
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_the_jpeg_scan_limit_is_a_setting(tiny_models_dir: Path, tmp_path: Path) -> None:
    bomb = images.progressive_jpeg_scan_bomb(side=256, repeats=200)  # 210 scans, cheap at this size
    with run_server(tiny_models_dir, tmp_path, max_jpeg_scans="300") as live:
        assert post_files(live, [bomb]).status_code == 200
    with run_server(tiny_models_dir, tmp_path, max_jpeg_scans="200") as live:
        response = post_files(live, [bomb])
        assert_error(response, 413, "image_too_large")
        assert "210 scans" in response.json()["error"]["message"]
