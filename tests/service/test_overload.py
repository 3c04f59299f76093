"""Hostile and overloaded clients: work admitted before it is done, every wait bounded, abandoned
work cancelled, and every response counted by what it really was."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.inference_protocol import HEADER_LENGTH
from tests.service import images
from tests.support import Server, metric_value, run_server, wait_for_in_flight, wait_for_metric


@pytest.fixture(scope="module")
def server(slower_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(
        slower_models_dir,
        tmp_path_factory.mktemp("overload"),
        max_concurrent_requests="2",
        body_timeout_s="1.0",
        max_batch_size="1",
        # The two busy requests of 8 slow images must both be admitted: the second one's predicted
        # wait (behind the first's 8 batches, timed at warm-up) passes the default 1 s cap.
        max_queue_wait_ms="30000",
    ) as live:
        yield live


def requests_total(server: Server) -> dict[tuple[str, str, str], float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {
        (s.labels["model"], s.labels["outcome"], s.labels["status_class"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "catdog_requests"
        for s in family.samples
        if s.name == "catdog_requests_total"
    }


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_head(sock: socket.socket) -> str:
    return read_response(sock)[0]


def read_response(sock: socket.socket) -> tuple[str, bytes]:
    """(head, lower case; body) of one response: the head, then Content-Length bytes of body."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            return received.decode(errors="replace").lower(), b""
        received += chunk
    head, body = received.split(b"\r\n\r\n", 1)
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head.decode().lower(), body


def slow_request(server: Server, results: list[int], n_images: int = 8) -> None:
    """Several images on the slow model (batch size 1 here): busy for a second or more."""
    files = [("file", (f"{i}.jpg", images.jpeg(), "image/jpeg")) for i in range(n_images)]
    response = httpx.post(f"{server.url}/classify", params={"model": "slow"}, files=files, timeout=60)
    results.append(response.status_code)


def slow_request_status(server: Server, n_images: int) -> int:
    results: list[int] = []
    slow_request(server, results, n_images)
    return results[0]


def counted_once(
    server: Server, reached: Callable[[dict[tuple[str, str, str], float]], bool], timeout: float = 30
) -> dict[tuple[str, str, str], float]:
    """requests_total once `reached` holds for it (a fixed sleep is too short on a loaded CI)."""
    deadline = time.monotonic() + timeout
    while not reached(counts := requests_total(server)):
        assert time.monotonic() < deadline, f"not reached within {timeout}s: {counts}"
        time.sleep(0.02)
    return counts


def start_busy_requests(server: Server, results: list[int], n: int = 2) -> list[threading.Thread]:
    """n slow requests (two: as many as `server` takes at once), admitted and working."""
    busy = [threading.Thread(target=slow_request, args=(server, results)) for _ in range(n)]
    for thread in busy:
        thread.start()
    wait_for_in_flight(server.url, n)
    return busy


@pytest.mark.slow
def test_excess_requests_are_refused_before_their_body_is_read(server: Server) -> None:
    results: list[int] = []
    busy = start_busy_requests(server, results)
    with connect(server) as sock:
        # Announce a body and send none of it: only a refusal that does not read it can answer.
        sock.sendall(
            b"POST /classify?model=slow HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 1000000\r\n\r\n"
        )
        head = read_head(sock)
    # A body over the limit is never taken: 413, even while the cap refuses the rest with 503.
    too_large = announce_and_stall(server, "/classify?model=slow", length=20 * 1024 * 1024 + 1)
    # 503, not the 408 that waiting for the body would end in: the refusal did not read it.
    assert head.startswith("http/1.1 503"), head
    assert "retry-after:" in head
    assert too_large.startswith("http/1.1 413"), too_large
    for thread in busy:
        thread.join()
    assert results == [200, 200]
    assert requests_total(server)[("slow", "overloaded", "5xx")] >= 1
    # Probes and metrics are never limited.
    assert httpx.get(f"{server.url}/readyz").status_code == 200


@pytest.mark.slow
def test_the_inference_protocol_route_is_admitted_and_refused_like_classify(server: Server) -> None:
    results: list[int] = []
    busy = start_busy_requests(server, results)
    refused = httpx.post(
        f"{server.url}/v2/models/slow/infer", content=images.jpeg(), headers={HEADER_LENGTH: "0"}
    )
    for thread in busy:
        thread.join()
    assert refused.status_code == 503 and "Retry-After" in refused.headers
    # Refused by the request cap or, if a busy request was still uploading, by the queue-wait cap:
    # either way admission control, in the protocol's shape.
    assert refused.json()["code"] == "overloaded" and isinstance(refused.json()["error"], str)
    assert requests_total(server)[("slow", "overloaded", "5xx")] >= 1
    # The second busy request may itself be refused by the queue-wait cap, now that the slow
    # model's batch times are measured: one of them must have been working throughout.
    assert 200 in results


def test_a_stalled_upload_is_timed_out_with_408(server: Server) -> None:
    before = requests_total(server).get(("slow", "request_timeout", "4xx"), 0)
    with connect(server) as sock:
        sock.sendall(
            b"POST /classify?model=slow HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 1000\r\n\r\n" + b"\xff" * 100
        )
        started = time.monotonic()
        head = read_head(sock)
        waited = time.monotonic() - started
    assert head.startswith("http/1.1 408"), head
    assert "connection: close" in head
    assert 0.8 < waited < 5
    assert requests_total(server)[("slow", "request_timeout", "4xx")] == before + 1


def test_rejections_are_counted_by_their_real_status(server: Server) -> None:
    before = requests_total(server)
    assert (
        httpx.post(
            f"{server.url}/classify",
            params={"model": "slow", "top": 0},
            content=images.jpeg(),
            headers={"Content-Type": "image/jpeg"},
        ).status_code
        == 422
    )
    assert (
        httpx.post(
            f"{server.url}/classify",
            params={"model": "slow"},
            content=b"x" * 21_000_000,
            headers={"Content-Type": "image/jpeg"},
        ).status_code
        == 413
    )
    assert (
        httpx.post(
            f"{server.url}/classify",
            params={"model": "slow"},
            content=b"not an image",
            headers={"Content-Type": "image/jpeg"},
        ).status_code
        == 415
    )
    after = requests_total(server)
    for key in [
        ("slow", "invalid_parameter", "4xx"),
        ("slow", "payload_too_large", "4xx"),
        ("slow", "invalid_image", "4xx"),
    ]:
        assert after.get(key, 0) == before.get(key, 0) + 1, key


def test_a_client_that_leaves_while_queued_cancels_its_work(server: Server) -> None:
    results: list[int] = []
    decoded_before = metric_value(server.url, "catdog_decode_seconds_count", "slow")
    images_before = metric_value(server.url, "catdog_images_total", "slow")
    busy = threading.Thread(target=slow_request, args=(server, results, 4))
    busy.start()
    wait_for_in_flight(server.url, 1)
    before = requests_total(server).get(("slow", "client_closed", "4xx"), 0)
    blob = images.jpeg()
    with connect(server) as sock:
        sock.sendall(
            b"POST /classify?model=slow HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(blob), blob)
        )
        # Decoded (once per request: this one and the busy one), so queued behind the busy images.
        wait_for_metric(server.url, "catdog_decode_seconds_count", decoded_before + 2, "slow")
    busy.join()
    counted_once(server, lambda counts: counts.get(("slow", "client_closed", "4xx"), 0) >= before + 1)
    # One more image after the busy ones: the queue is first come, first served, so had the
    # abandoned image stayed queued it would have run before this one.
    assert slow_request_status(server, n_images=1) == 200
    assert results == [200]
    # Only the busy request's images and the last one ran: the abandoned one was cancelled.
    assert metric_value(server.url, "catdog_images_total", "slow") == images_before + 4 + 1
    assert "ERROR" not in server.log() and "Traceback" not in server.log()


def test_a_disconnect_mid_upload_is_neither_an_error_nor_a_5xx(server: Server) -> None:
    before = requests_total(server)
    with connect(server) as sock:
        sock.sendall(
            b"POST /classify?model=slow HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"\xff" * 1000
        )
        time.sleep(0.1)  # part of the body arrives, then the client leaves
    after = counted_once(server, lambda counts: counts != before)
    new = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert new == {("slow", "client_closed", "4xx"): 1}
    assert "ERROR" not in server.log() and "Traceback" not in server.log()


def test_a_deadline_covers_all_of_the_requests_images(server: Server) -> None:
    # One image on the slow model (batch size 1 here) takes about `single` seconds; eight take
    # about eight times that. A deadline of three singles fits one image but never eight: the
    # request must be refused at once with 504, not answered 200 long after its deadline.
    one = httpx.post(
        f"{server.url}/classify",
        params={"model": "slow"},
        content=images.jpeg(),
        headers={"Content-Type": "image/jpeg"},
        timeout=60,
    )
    single_ms = one.json()["timings_ms"]["inference"]
    deadline_ms = max(30.0, 3 * single_ms)
    files = [("file", (f"{i}.jpg", images.jpeg(), "image/jpeg")) for i in range(8)]
    late = httpx.post(
        f"{server.url}/classify",
        params={"model": "slow"},
        files=files,
        timeout=60,
        headers={"X-Deadline-Ms": str(deadline_ms)},
    )
    assert late.status_code == 504, (late.status_code, late.text[:300], single_ms)
    assert late.json()["error"]["code"] == "deadline_exceeded"
    # Refused on the prediction for its own eight images, before queueing any of them (not
    # "deadline passed while queued" after holding a place in the queue until it expired).
    assert "cannot be met" in late.json()["error"]["message"], late.text


@pytest.mark.slow
def test_a_refused_small_upload_keeps_its_connection(server: Server) -> None:
    """Refusing by closing costs every refused client a new connection (and the server its setup):
    a small body is read and dropped instead, and the connection serves the next request."""
    results: list[int] = []
    busy = start_busy_requests(server, results)
    blob = images.jpeg()
    request = (
        b"POST /classify?model=slow HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(blob), blob)
    )
    with connect(server) as sock:
        sock.sendall(request)
        head = read_head(sock)
        assert head.startswith("http/1.1 503") and "connection: close" not in head, head
        # Probes on the same connection while the busy requests finish: an idle connection would
        # meet uvicorn's keep-alive timeout (5 s) on a machine slow enough, which is not this test.
        while any(thread.is_alive() for thread in busy):
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_head(sock).startswith("http/1.1 200")
            time.sleep(0.5)
        sock.sendall(request)
        assert read_head(sock).startswith("http/1.1 200")


@pytest.fixture(scope="module")
def queue_capped_server(
    slower_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Room for many requests at once, but a short queue-wait cap: the cap is what refuses."""
    with run_server(
        slower_models_dir,
        tmp_path_factory.mktemp("queue-capped"),
        max_concurrent_requests="16",
        body_timeout_s="1.0",
        max_batch_size="1",
        max_queue_wait_ms="100",
    ) as live:
        yield live


def announce_and_stall(server: Server, target: str, length: int = 1_000_000) -> str:
    """The head of the answer to a request that announces a large body and sends none of it."""
    with connect(server) as sock:
        sock.sendall(
            f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
        )
        return read_head(sock)


@pytest.mark.slow
def test_a_model_whose_queue_is_past_the_wait_cap_refuses_before_the_body_is_read(
    queue_capped_server: Server,
) -> None:
    """Refusing after the upload costs the CPU of reading and parsing it; under a CPU quota a client
    pool that retries at once spent that CPU many hundred times a second, taken from admitted work.
    """
    results: list[int] = []
    busy = threading.Thread(target=slow_request, args=(queue_capped_server, results))
    busy.start()
    # its eight images queued: seconds of work on the slow model
    wait_for_metric(queue_capped_server.url, "catdog_queue_depth", 1, model="slow")
    head = announce_and_stall(queue_capped_server, "/classify?model=slow")
    protocol_head = announce_and_stall(queue_capped_server, "/v2/models/slow/infer")
    # The cascade chooses per image (its small model's queue is empty): it waits for the body.
    cascade_head = announce_and_stall(queue_capped_server, "/classify?model=cascade")
    other_model = httpx.post(
        f"{queue_capped_server.url}/classify",
        params={"model": "fast"},
        content=images.jpeg(),
        headers={"Content-Type": "image/jpeg"},
    )
    busy.join()
    # 503, not the 408 that waiting for the body would end in.
    assert head.startswith("http/1.1 503"), head
    assert "retry-after:" in head
    assert protocol_head.startswith("http/1.1 503"), protocol_head
    assert cascade_head.startswith("http/1.1 408"), cascade_head
    # Only the model whose queue is long refuses; the first request finishes.
    assert other_model.status_code == 200, other_model.text
    assert results == [200]
    assert requests_total(queue_capped_server)[("slow", "overloaded", "5xx")] >= 2


@pytest.mark.slow
def test_a_body_over_the_limit_gets_413_even_when_the_model_would_refuse(queue_capped_server: Server) -> None:
    """A 503 says 'retry later'; a body over the limit will never be taken, so a client told 503
    retries it for nothing until the load passes. What the head alone makes certain comes first."""
    results: list[int] = []
    busy = threading.Thread(target=slow_request, args=(queue_capped_server, results))
    busy.start()
    # its eight images queued: the slow model refuses before the body
    wait_for_metric(queue_capped_server.url, "catdog_queue_depth", 1, model="slow")
    over = 20 * 1024 * 1024 + 1
    head = announce_and_stall(queue_capped_server, "/classify?model=slow", length=over)
    protocol_head = announce_and_stall(queue_capped_server, "/v2/models/slow/infer", length=over)
    within = announce_and_stall(queue_capped_server, "/classify?model=slow")
    busy.join()
    assert head.startswith("http/1.1 413"), head
    assert protocol_head.startswith("http/1.1 413"), protocol_head
    assert within.startswith("http/1.1 503"), within  # the model was refusing all the while
    assert results == [200]


@pytest.mark.slow
def test_an_unknown_model_gets_404_even_while_the_cap_refuses_work(server: Server) -> None:
    """A 503 would tell the client to retry what can never succeed: a refused request's model name
    is checked, and an unknown one answered 404 instead."""
    results: list[int] = []
    busy = start_busy_requests(server, results)
    classify = httpx.post(
        f"{server.url}/classify",
        params={"model": "no-such-model"},
        content=images.jpeg(),
        headers={"Content-Type": "image/jpeg"},
    )
    infer = httpx.post(
        f"{server.url}/v2/models/no-such-model/infer", content=images.jpeg(), headers={HEADER_LENGTH: "0"}
    )
    # Still refused by the cap while the busy requests work: a known model is turned away.
    known = httpx.post(
        f"{server.url}/classify",
        params={"model": "slow"},
        content=images.jpeg(),
        headers={"Content-Type": "image/jpeg"},
    )
    for thread in busy:
        thread.join()
    assert classify.status_code == 404, classify.text
    assert classify.json()["error"]["code"] == "model_not_found"
    assert infer.status_code == 404, infer.text
    assert infer.json()["code"] == "model_not_found"
    assert known.status_code == 503
    assert 200 in results
