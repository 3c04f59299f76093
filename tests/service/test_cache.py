"""The response cache: bounds in entries and bytes, keys with the model version, and answers from
it that are the uncached answers, byte for byte, apart from timings and the cache flag."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from service.cache import CachedAnswer, CacheMetrics, ResponseCache, key_for
from service.inference_protocol import HEADER_LENGTH
from tests.service import images
from tests.support import Server, run_server

ANSWER = CachedAnswer("dog", (("cat", 0.25), ("dog", 0.75)), 0.75)


def cache(max_entries: int = 100, max_bytes: int = 1 << 20) -> tuple[ResponseCache, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = CacheMetrics(
        lookups=Counter("lookups", "", ["model", "result"], registry=registry),
        evictions=Counter("evictions", "", ["reason"], registry=registry),
        entries=Gauge("entries", "", registry=registry),
        size_bytes=Gauge("size", "", registry=registry),
    )
    return ResponseCache(max_entries, max_bytes, metrics), registry


def test_eviction_by_entries_drops_the_least_recently_used() -> None:
    lru, registry = cache(max_entries=2)
    a, b, c = (key_for(bytes([i]), "m", "v1") for i in range(3))
    lru.put(a, ANSWER)
    lru.put(b, ANSWER)
    assert lru.get(a) == ANSWER  # a is now the most recently used
    lru.put(c, ANSWER)
    assert len(lru) == 2 and lru.get(b) is None and lru.get(a) == ANSWER and lru.get(c) == ANSWER
    assert registry.get_sample_value("evictions_total", {"reason": "entries"}) == 1
    assert registry.get_sample_value("lookups_total", {"model": "m", "result": "hit"}) == 3
    assert registry.get_sample_value("lookups_total", {"model": "m", "result": "miss"}) == 1


def test_eviction_by_bytes() -> None:
    lru, registry = cache()
    first = key_for(b"first", "m", "v1")
    lru.put(first, ANSWER)
    cost = lru.size_bytes
    lru, registry = cache(max_bytes=2 * cost + cost // 2)  # room for two entries, not three
    keys = [key_for(bytes([i]), "m", "v1") for i in range(3)]
    for key in keys:
        lru.put(key, ANSWER)
    assert len(lru) == 2 and lru.get(keys[0]) is None and lru.size_bytes == 2 * cost
    assert registry.get_sample_value("evictions_total", {"reason": "bytes"}) == 1
    assert registry.get_sample_value("size") == 2 * cost and registry.get_sample_value("entries") == 2


def test_an_answer_larger_than_the_whole_cache_is_not_stored() -> None:
    lru, _ = cache(max_bytes=1024)
    lru.put(key_for(b"x", "m", "v1"), ANSWER)
    big = CachedAnswer("dog", tuple((f"label-{i}", 0.1) for i in range(100)), 0.1)
    lru.put(key_for(b"y", "m", "v1"), big)
    assert len(lru) == 1 and lru.get(key_for(b"x", "m", "v1")) == ANSWER


def test_keys_include_the_model_and_its_version() -> None:
    lru, _ = cache()
    lru.put(key_for(b"photo", "mobilenet", "aaaa"), ANSWER)
    assert lru.get(key_for(b"photo", "mobilenet", "aaaa")) == ANSWER
    assert lru.get(key_for(b"photo", "mobilenet", "bbbb")) is None  # a rebuilt model
    assert lru.get(key_for(b"photo", "xception", "aaaa")) is None
    assert lru.get(key_for(b"photo!", "mobilenet", "aaaa")) is None


@pytest.fixture(scope="module")
def cached_server(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tiny_models_dir, tmp_path_factory.mktemp("cache"), cache_max_entries="100") as live:
        yield live


def without_run_details(body: dict[str, object]) -> dict[str, object]:
    """The response minus what describes this run rather than the answer."""
    kept = {k: v for k, v in body.items() if k not in ("request_id", "timings_ms", "batch_sizes")}
    kept["results"] = [{k: v for k, v in r.items() if k != "cached"} for r in body["results"]]  # type: ignore[attr-defined]
    return kept


@pytest.mark.parametrize("model", ["fast", "slow", "cascade"])
def test_a_cached_answer_is_the_uncached_answer(cached_server: Server, model: str) -> None:
    photos = [images.jpeg(200 + len(model), 150), images.jpeg(64, 64 + len(model))]
    files = [("file", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(photos)]
    params = {"model": model} | ({"min_confidence": "0.99"} if model == "cascade" else {})
    first = httpx.post(f"{cached_server.url}/classify", params=params, files=files)
    second = httpx.post(f"{cached_server.url}/classify", params=params, files=files)
    assert first.status_code == second.status_code == 200
    assert [r["cached"] for r in first.json()["results"]] == [False, False]
    assert [r["cached"] for r in second.json()["results"]] == [True, True]
    assert without_run_details(second.json()) == without_run_details(first.json())
    assert second.json()["batch_sizes"] == []  # nothing ran


def test_the_protocol_route_shares_the_cache_and_says_so(cached_server: Server) -> None:
    photo = images.jpeg(123, 77)
    answers = [
        httpx.post(
            f"{cached_server.url}/v2/models/fast/infer", content=photo, headers={HEADER_LENGTH: "0"}
        ).json()
        for _ in range(2)
    ]
    assert [a["parameters"]["cached"] for a in answers] == [0, 1]
    assert answers[0]["outputs"] == answers[1]["outputs"]
    text = httpx.get(f"{cached_server.url}/metrics").text
    lookups = {
        (s.labels["model"], s.labels["result"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "catdog_cache_lookups"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert lookups[("fast", "hit")] >= 1 and lookups[("fast", "miss")] >= 1
