"""Header values a client controls, hostile or merely odd, on every route that reads them: each
answer is one the contract documents (never a 500), and the server stays ready.

Headers reach the app as Latin-1 text, so superscript digits such as '²', signs, exponents, huge numbers
and stray bytes are all fair game; this found `Inference-Header-Content-Length: ²` answering 500.
"""

from __future__ import annotations

import base64
import json
import random
import socket

import httpx

from tests.service import images
from tests.support import Server

PHOTO = images.jpeg()
V2_JSON = json.dumps(
    {
        "inputs": [
            {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(PHOTO).decode()]}
        ]
    }
).encode()
ODD_VALUES = [
    b"",
    b" ",
    b"\xb2",
    b"\xb9\xb3",
    b"1e3",
    b"-1",
    b"+5",
    b"nan",
    b"inf",
    b"0x10",
    b"9" * 40,
    b"\xff\xfe",
    b"multipart/form-data",
    b"multipart/form-data; boundary=",
    b"multipart/form-data; boundary=\xe9\xe9",
    b"image/jpeg; charset=\xff",
    b"application/json",
    b"gzip",
    b"identity, gzip",
    b"1.5",
]
HEADERS = ["Content-Type", "X-Deadline-Ms", "Inference-Header-Content-Length", "Content-Encoding", "Accept"]
ROUTES = [
    ("/classify?model=fast", PHOTO),
    ("/classify?model=cascade", PHOTO),
    ("/v2/models/fast/infer", V2_JSON),
    ("/v2/models/auto/infer", V2_JSON),
    ("/v2/models/fast/infer", PHOTO),
]


def random_value(rng: random.Random) -> bytes:
    if rng.random() < 0.6:
        return rng.choice(ODD_VALUES)
    return bytes(rng.choice([*range(32, 127), *range(160, 256)]) for _ in range(rng.randrange(0, 10)))


def send_raw(url: str, path: str, headers: dict[str, bytes], body: bytes) -> int:
    """One request written byte for byte (HTTP clients refuse to send some of these values) and
    the status of its answer; 0 if the server closed without one."""
    host, port = url.removeprefix("http://").split(":")
    head = b"".join(name.encode() + b": " + value + b"\r\n" for name, value in headers.items())
    request = (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n" % len(body) + head + b"\r\n" + body
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line = answer.split(b"\r\n", 1)[0].split(b" ")
    return int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0


def test_odd_header_values_get_only_documented_answers(tiny_server: Server) -> None:
    rng = random.Random(20261124)
    statuses: dict[int, int] = {}
    for _ in range(300):
        path, body = rng.choice(ROUTES)
        headers = {name: random_value(rng) for name in rng.sample(HEADERS, rng.randrange(1, 4))}
        status = send_raw(tiny_server.url, path, headers, body)
        statuses[status] = statuses.get(status, 0) + 1
    assert httpx.get(f"{tiny_server.url}/readyz").status_code == 200
    # 504 is a deadline the request itself set too short (X-Deadline-Ms), a documented answer.
    assert set(statuses) <= {200, 400, 413, 415, 422, 504}, statuses
    assert 200 in statuses and 400 in statuses, statuses  # both kinds of answer were reached
    assert "Traceback" not in tiny_server.log()
