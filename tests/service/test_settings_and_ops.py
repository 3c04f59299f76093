"""Operational settings: cross-checks at start, the drain timeout, the extra metrics port."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.__main__ import uvicorn_config
from service.app import create_app
from service.logging_setup import RepeatedWarnings
from service.metrics import ServiceMetrics
from service.settings import Settings
from tests.service import images
from tests.support import free_port, run_server


def test_a_queue_smaller_than_one_full_request_is_refused_at_start() -> None:
    # A multipart request of max_files images could never be admitted: 503 forever.
    with pytest.raises(ValidationError, match="queue_size"):
        Settings(queue_size=8, max_batch_size=8, max_files=16)
    assert Settings(queue_size=16, max_batch_size=8, max_files=16).queue_size == 16


def test_a_sub_second_drain_timeout_reaches_uvicorn_unchanged(tiny_models_dir: Path) -> None:
    settings = Settings(models_dir=tiny_models_dir, drain_timeout_s=0.5)
    config = uvicorn_config(create_app(settings), settings, "127.0.0.1", 0)
    assert config.timeout_graceful_shutdown == 0.5


def test_uvicorn_runs_on_httptools_and_uvloop(tiny_models_dir: Path) -> None:
    # Both are dependencies: "auto" must find them (refusals cost half as much, README "Overload").
    settings = Settings(models_dir=tiny_models_dir)
    config = uvicorn_config(create_app(settings), settings, "127.0.0.1", 0)
    config.load()
    assert issubclass(config.http_protocol_class, HttpToolsProtocol)  # bounded head: test_http_head.py
    assert config.get_loop_factory().__module__.startswith("uvloop")


def test_no_route_or_dependency_hops_to_the_thread_pool(tiny_models_dir: Path) -> None:
    # FastAPI runs a plain `def` endpoint or dependency in its thread pool: a thread hop per request
    # for what is a field lookup here (two per /classify before this test). Everything is async.
    def calls(dependant: Dependant) -> list[Callable[..., object]]:
        own = [dependant.call] if dependant.call else []
        return own + [c for d in dependant.dependencies for c in calls(d)]

    app = create_app(Settings(models_dir=tiny_models_dir))
    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    assert any(r.path == "/classify" for r in routes)
    sync = {
        f"{route.path}: {call.__name__}"
        for route in routes
        for call in calls(route.dependant)
        if not inspect.iscoroutinefunction(call)
    }
    assert sync == set()


def _queue_depth(text: str, model: str) -> float:
    for family in text_string_to_metric_families(text):
        if family.name == "catdog_queue_depth":
            return next(s.value for s in family.samples if s.labels["model"] == model)
    raise AssertionError("no catdog_queue_depth")


@pytest.mark.slow
def test_metrics_port_binds_the_main_host_and_shows_live_queue_depth(
    slower_models_dir: Path, tmp_path: Path
) -> None:
    metrics_port = free_port()
    with run_server(
        slower_models_dir, tmp_path, metrics_port=str(metrics_port), max_batch_size="1", queue_size="64"
    ) as server:
        listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
        local = {line.split()[1] for line in listening if line.split()[3] == "0A"}  # 0A: LISTEN
        assert f"0100007F:{metrics_port:04X}" in local  # 127.0.0.1, like --host
        assert f"00000000:{metrics_port:04X}" not in local  # not 0.0.0.0

        async def burst_and_scrape() -> float:
            async with httpx.AsyncClient(timeout=120) as client:
                posts = [
                    asyncio.create_task(
                        client.post(
                            f"{server.url}/classify",
                            params={"model": "slow"},
                            content=images.jpeg(),
                            headers={"Content-Type": "image/jpeg"},
                        )
                    )
                    for _ in range(8)
                ]
                # Only the extra port is scraped: no request to the main /metrics refreshes anything.
                # Scraped until the burst is seen queued or has been answered (a fixed 0.3 s wait
                # missed it on a loaded machine, before the images were even decoded and queued).
                deepest = 0.0
                while deepest < 1 and not all(post.done() for post in posts):
                    scraped = await client.get(f"http://127.0.0.1:{metrics_port}/metrics")
                    deepest = max(deepest, _queue_depth(scraped.text, "slow"))
                    await asyncio.sleep(0.01)
                await asyncio.gather(*posts)
                return deepest

        assert asyncio.run(burst_and_scrape()) >= 1


def test_the_shutdown_count_of_responses_adds_up_every_model() -> None:
    # Logged at shutdown so a drain can be checked against what clients received: the same outcome
    # on two models is the sum of both, not whichever model was counted last.
    metrics = ServiceMetrics()
    for model, outcome, status_class in [
        ("xception", "ok", "2xx"),
        ("mobilenet", "ok", "2xx"),
        ("mobilenet", "ok", "2xx"),
        ("cascade", "overloaded", "5xx"),
    ]:
        metrics.requests.labels(model, outcome, status_class).inc()
    assert metrics.responses_by_outcome() == {"ok 2xx": 3, "overloaded 5xx": 1}


def warning(message: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.error", level, __file__, 1, message, None, None)


def test_a_repeated_warning_is_let_through_once_per_interval_and_says_what_it_held_back() -> None:
    repeated = RepeatedWarnings(interval_s=0.3)
    assert repeated.filter(warning("Invalid HTTP request received."))
    assert not any(repeated.filter(warning("Invalid HTTP request received.")) for _ in range(4))
    assert repeated.filter(warning("Unsupported upgrade request."))  # another message: its own count
    assert repeated.filter(warning("Invalid HTTP request received.", logging.ERROR))  # never held back
    time.sleep(0.35)
    record = warning("Invalid HTTP request received.")
    assert repeated.filter(record)
    assert "(4 more like it in the last " in record.getMessage()


def test_the_repeated_warnings_filter_remembers_a_bounded_number_of_messages() -> None:
    repeated = RepeatedWarnings(interval_s=60, max_messages=3)
    for n in range(1000):  # messages carrying client text would each be new
        repeated.filter(warning(f"bad {n}"))
    assert not repeated.filter(warning("bad 999"))  # among the 3 most recent: still held back
    assert repeated.filter(warning("bad 0"))  # forgotten long ago: let through as new
