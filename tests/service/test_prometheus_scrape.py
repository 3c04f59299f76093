"""A real Prometheus server scrapes a live catdog-serve and sees the traffic it was sent."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service import images
from tests.support import Server, free_port

PROMETHEUS = shutil.which("prometheus")


@contextlib.contextmanager
def prometheus(target: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: catdog\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def query(base: str, expression: str) -> list[dict[str, object]]:
    response = httpx.get(f"{base}/api/v1/query", params={"query": expression}, timeout=5)
    response.raise_for_status()
    return response.json()["data"]["result"]


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed (CI installs it)")
def test_prometheus_scrapes_the_service_metrics(tiny_server: Server, tmp_path: Path) -> None:
    for _ in range(5):
        httpx.post(
            f"{tiny_server.url}/classify?model=slow",
            content=images.jpeg(),
            headers={"Content-Type": "image/jpeg"},
            timeout=30,
        ).raise_for_status()
    httpx.post(
        f"{tiny_server.url}/classify?model=slow",
        content=b"not an image",
        headers={"Content-Type": "image/jpeg"},
    )
    with prometheus(tiny_server.url.removeprefix("http://"), tmp_path) as base:
        deadline = time.monotonic() + 60
        ok: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                ok = query(base, 'catdog_requests_total{model="slow",outcome="ok"}')
                if ok:
                    break
            time.sleep(0.5)
        assert ok, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert float(ok[0]["value"][1]) >= 5
        assert query(base, 'up{job="catdog"}')[0]["value"][1] == "1"
        bad = query(base, 'catdog_requests_total{model="slow",status_class="4xx"}')
        assert float(bad[0]["value"][1]) >= 1
        # Histograms aggregate across pods as they should: a p99 comes out of the buckets.
        p99 = query(
            base, 'histogram_quantile(0.99, sum by (le) (catdog_inference_seconds_bucket{model="slow"}))'
        )
        assert p99 and float(p99[0]["value"][1]) > 0
        assert query(base, 'catdog_model_info{model="fast",device="cpu"}')
