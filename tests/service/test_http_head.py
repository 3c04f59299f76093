"""Connections are bounded in bytes and time where uvicorn left them open: the request head (request
line and headers), a body no route reads, answers a client does not read.

Before this, one connection sending a 200 MiB header value raised the server's RSS by 320 MiB
(more bytes, more memory, until the pod is OOM-killed), and a connection that sent half a head,
or nothing, was held open for ever.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Server, run_server

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT_S = 1.0
MAX_BODY = 1 << 20
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def bounded(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    limits = {"max_head_bytes": MAX_HEAD, "head_timeout_s": HEAD_TIMEOUT_S}
    limits |= {"max_body_bytes": MAX_BODY, "body_timeout_s": BODY_TIMEOUT_S}
    with run_server(tiny_models_dir, tmp_path_factory.mktemp("head"), **_env(limits)) as server:
        yield server


def _env(settings: dict[str, float]) -> dict[str, str]:
    return {name: str(value) for name, value in settings.items()}


def _connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _stream_until_answered(sock: socket.socket, start: bytes, filler: bytes, most: int) -> int:
    """Send `start`, then `filler` until the server answers or closes; the bytes sent."""
    sock.sendall(start)
    sent = len(start)
    while sent < most:
        if select.select([sock], [], [], 0)[0]:
            break
        try:
            sock.sendall(filler)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(filler)
    return sent


def _status_or_closed(sock: socket.socket, wait_s: float = 5.0) -> int | None:
    """The status of the answer, or None if the server closed without one."""
    sock.settimeout(wait_s)
    received = b""
    try:
        while b"\r\n" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    except ConnectionResetError:
        pass
    return int(received.split(b" ")[1]) if received.startswith(b"HTTP/1.1 ") else None


def _closed_early(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "catdog_http_connections_closed_early"
        for s in family.samples
        if s.name.endswith("_total")
    }


def test_a_header_past_the_cap_is_answered_431_and_its_connection_closed(bounded: Server) -> None:
    before = _closed_early(bounded).get("head_too_large", 0)
    with _connect(bounded) as sock:
        sent = _stream_until_answered(
            sock, b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: ", b"a" * 4096, 8 << 20
        )
        assert sent < 8 << 20  # answered (or cut off) near the cap: the client never sent it all
        assert _status_or_closed(sock) == 431
    assert httpx.get(f"{bounded.url}/readyz").status_code == 200
    assert _closed_early(bounded)["head_too_large"] == before + 1


def test_a_url_past_the_cap_is_answered_414(bounded: Server) -> None:
    with _connect(bounded) as sock:
        _stream_until_answered(sock, b"GET /livez?q=", b"a" * 4096, 8 << 20)
        assert _status_or_closed(sock) == 414
    assert httpx.get(f"{bounded.url}/readyz").status_code == 200


def test_a_head_that_stalls_is_answered_408_within_the_timeout(bounded: Server) -> None:
    before = _closed_early(bounded).get("head_timeout", 0)
    with _connect(bounded) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert _status_or_closed(sock, wait_s=HEAD_TIMEOUT_S + 10) == 408
        assert time.monotonic() - started < HEAD_TIMEOUT_S + 9  # bounded, not held open for ever
    assert _closed_early(bounded)["head_timeout"] == before + 1


def test_the_protocols_own_answers_carry_the_date_and_a_json_error(bounded: Server) -> None:
    """408/414/431/400/503 are written by the protocol, not the app: the same headers (RFC 9110 asks
    a server with a clock for a Date on 4xx) and the documented error body."""
    with _connect(bounded) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        sock.settimeout(HEAD_TIMEOUT_S + 10)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    assert email.utils.parsedate_to_datetime(headers[b"date"].decode()).year >= 2026
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body)["error"]["code"] == "head_timeout"


def test_a_connection_that_sends_nothing_is_closed(bounded: Server) -> None:
    before = _closed_early(bounded).get("head_timeout", 0)
    with _connect(bounded) as sock:
        assert _status_or_closed(sock, wait_s=HEAD_TIMEOUT_S + 10) is None
        sock.settimeout(1)
        assert sock.recv(1) == b""  # closed (EOF), not a read timeout
    assert _closed_early(bounded)["head_timeout"] == before + 1


def test_heads_within_the_cap_and_kept_alive_connections_work(bounded: Server) -> None:
    with httpx.Client(base_url=bounded.url) as client:
        first = client.get("/readyz", headers={"X-Filler": "a" * (MAX_HEAD // 2)})
        time.sleep(HEAD_TIMEOUT_S / 2)
        second = client.get("/readyz")  # same connection, within uvicorn's keep-alive
        assert (first.status_code, second.status_code) == (200, 200)


def test_a_body_no_route_reads_is_not_discarded_for_ever(bounded: Server) -> None:
    # A chunked body on a route that never reads one (a probe, /models): uvicorn answered, then read
    # and dropped whatever followed, 2.3 GB/s for as long as the client sent, half a core of the
    # event loop per connection. Now the connection closes once a body cap's worth is dropped.
    chunk = b"%x\r\n%s\r\n" % (65536, b"a" * 65536)
    before = _closed_early(bounded).get("unread_body", 0)
    with _connect(bounded) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        sent, most = 0, 64 * MAX_BODY
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < most:
                sock.sendall(chunk)
                sent += len(chunk)
        assert sent < most
    assert httpx.get(f"{bounded.url}/readyz").status_code == 200
    assert _closed_early(bounded)["unread_body"] == before + 1


def test_answers_to_a_client_that_stopped_reading_do_not_wait_for_ever(bounded: Server) -> None:
    # Pipelined requests whose answers the client does not read: once the socket buffers filled, the
    # server waited for the client for ever (and delivered all of them whenever it came back).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small buffers fill fast
    host, port = bounded.url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    asked, before = 0, _closed_early(bounded).get("write_timeout", 0)
    with sock:
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while asked < 2000:
                sock.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                asked += 1
        # Reading nothing meanwhile, until the server gives up (bounded: a busy machine may take
        # a while to fill the buffers and pause, but not for ever).
        give_up = time.monotonic() + BODY_TIMEOUT_S + 30
        while _closed_early(bounded).get("write_timeout", 0) == before and time.monotonic() < give_up:
            time.sleep(0.25)
        sock.setblocking(True)
        sock.settimeout(10)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                received += chunk  # what was buffered before the server gave up, then EOF
    assert asked > 100
    assert received.count(b"HTTP/1.1 200") < asked // 2
    assert httpx.get(f"{bounded.url}/readyz").status_code == 200
    assert _closed_early(bounded)["write_timeout"] == before + 1


MAX_CONNECTIONS = 8


@pytest.fixture  # one server per test: the connections a test closes never count in the next
def few_connections(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    limits = _env({"max_connections": MAX_CONNECTIONS, "max_head_bytes": MAX_HEAD})
    with run_server(tiny_models_dir, tmp_path_factory.mktemp("connections"), **limits) as server:
        yield server


def _read_to_eof(sock: socket.socket) -> tuple[bytes, bytes]:
    """The head and body of what the server sends before it closes."""
    sock.settimeout(5)
    answer = b""
    while chunk := sock.recv(1 << 16):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


def _whole_answer(sock: socket.socket) -> bytes:
    """One answer with a Content-Length, read to its last byte (the connection stays open)."""
    sock.settimeout(5)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(4096)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")
        )
    )
    while len(body) < length:
        body += sock.recv(4096)
    return answer


def _still_open_and_unanswered(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    return False


def test_at_the_cap_the_connection_waiting_longest_makes_room(few_connections: Server) -> None:
    # Each open connection may hold an unfinished head of up to the head cap: 15,000 connections
    # holding 60 KiB each took the server from 797 to 1,787 MiB RSS. So the count is capped; and so
    # that a client holding the cap's worth of slow heads does not lock everyone else out (probes
    # included), a new connection closes the one that has waited longest for a request.
    before = _closed_early(few_connections)
    held = [_connect(few_connections) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (MAX_HEAD // 2))
            time.sleep(0.05)  # an order the server sees
        with httpx.Client(base_url=few_connections.url) as client:
            assert client.get("/readyz").status_code == 200
        head, body = _read_to_eof(held[0])
        assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in head.lower()
        assert b"too_many_connections" in body
        assert all(_still_open_and_unanswered(sock) for sock in held[1:])
    finally:
        for sock in held:
            sock.close()
    after = _closed_early(few_connections)
    assert after["evicted"] == before.get("evicted", 0) + 1
    assert after.get("too_many_connections", 0) == before.get("too_many_connections", 0)


def test_at_the_cap_an_idle_kept_alive_connection_is_closed_without_an_answer(
    few_connections: Server,
) -> None:
    before = _closed_early(few_connections).get("evicted", 0)
    idle = [_connect(few_connections) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in idle:  # one request each, answered; then nothing (kept alive)
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _whole_answer(sock).startswith(b"HTTP/1.1 200 ")
            time.sleep(0.05)
        with httpx.Client(base_url=few_connections.url) as client:
            assert client.get("/readyz").status_code == 200
        idle[0].settimeout(5)
        assert idle[0].recv(1 << 16) == b""  # closed, nothing sent
        assert all(_still_open_and_unanswered(sock) for sock in idle[1:])
    finally:
        for sock in idle:
            sock.close()
    assert _closed_early(few_connections)["evicted"] == before + 1


def test_connections_past_the_cap_are_refused_while_every_one_is_being_answered(
    few_connections: Server,
) -> None:
    before = _closed_early(few_connections).get("too_many_connections", 0)
    busy = [_connect(few_connections) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in busy:  # admitted uploads, their bodies still arriving: nothing to close
            sock.sendall(
                b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000\r\n\r\n" + b"\x00" * 1000
            )
        time.sleep(0.5)
        with _connect(few_connections) as extra:
            head, body = _read_to_eof(extra)  # answered without sending a byte, then closed
        assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in head.lower()
        assert b"too_many_connections" in body
        assert all(_still_open_and_unanswered(sock) for sock in busy)
    finally:
        for sock in busy:
            sock.close()
    time.sleep(0.5)  # the server sees them go
    assert httpx.get(f"{few_connections.url}/readyz").status_code == 200
    assert _closed_early(few_connections)["too_many_connections"] == before + 1


def test_malformed_requests_are_counted_and_do_not_flood_the_log(bounded: Server) -> None:
    # uvicorn answers a request it cannot parse with 400 and logs a WARNING for each one: a client
    # could grow the logs (and bury everything else in them) at its own request rate.
    before = _closed_early(bounded).get("invalid_request", 0)
    logged_before = bounded.log().count("Invalid HTTP request")
    for _ in range(50):
        with _connect(bounded) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert _status_or_closed(sock) == 400
    assert httpx.get(f"{bounded.url}/readyz").status_code == 200
    assert _closed_early(bounded)["invalid_request"] == before + 50
    assert bounded.log().count("Invalid HTTP request") - logged_before <= 1
