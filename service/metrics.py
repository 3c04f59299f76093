"""Prometheus metrics, defined once. Labels come from small fixed sets: model names from the
manifest, outcomes and status classes from code, never raw strings a client sent."""

from __future__ import annotations

import collections
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
_CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
UNKNOWN_MODEL = "_unknown"  # label for requests whose model name matched nothing


@dataclass(frozen=True)
class CacheMetrics:
    """The response cache's (service/cache.py)."""

    lookups: Counter  # labels: model, result (hit or miss)
    evictions: Counter  # labels: reason (entries or bytes)
    entries: Gauge
    size_bytes: Gauge


@dataclass(frozen=True)
class ShadowMetrics:
    """The live quality watch's (service/shadow.py)."""

    comparisons: Counter  # labels: small, large, outcome (agree, disagree, skipped_busy, failed)
    disagreement_confidence: Histogram  # labels: small; the small model's confidence when it differed
    expected_agreement: Gauge  # labels: small, large; the floor the build's test figures give


class ServiceMetrics:
    """One instance per app, on its own registry, so tests and several apps never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "catdog_requests_total",
            "Classification requests.",
            ["model", "outcome", "status_class"],
            registry=r,
        )
        self.connections_closed_early = Counter(
            "catdog_http_connections_closed_early_total",
            "Connections the HTTP layer closed early: at the connection cap (evicted to make room, or "
            "refused), a request it could not parse, a head too large or too slow, a body no route "
            "read, answers a client stopped reading.",
            ["reason"],
            registry=r,
        )
        self.images = Counter("catdog_images_total", "Images classified.", ["model"], registry=r)
        self.decode_seconds = Histogram(
            "catdog_decode_seconds",
            "Per request: the wait for a decode thread and the decoding and preprocessing of all "
            "of its images.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "catdog_queue_wait_seconds",
            "Per request: the longest wait of its images from queued to their batch's start.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "catdog_inference_seconds",
            "session.run time per batch.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "catdog_request_seconds",
            "End-to-end request time.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "catdog_batch_size", "Images per inference batch.", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.lone_images = Counter(
            "catdog_lone_images_total",
            "Images that ran alone on an idle inference lane, by where: one worker's thread "
            "(one_core) or a session with every core (every_core).",
            ["model", "layout"],
            registry=r,
        )
        self.queue_depth = Gauge("catdog_queue_depth", "Images waiting per model.", ["model"], registry=r)
        self.in_flight = Gauge("catdog_in_flight_requests", "Requests being handled.", registry=r)
        self.model_info = Gauge(
            "catdog_model_info",
            "Loaded models (value 1).",
            ["model", "version", "device", "precision"],
            registry=r,
        )
        self.ready = Gauge("catdog_ready", "1 when every model is loaded and warm.", registry=r)
        self.selections = Counter(
            "catdog_selection_total",
            "Models chosen by auto/cascade.",
            ["mode", "model", "reason"],
            registry=r,
        )
        self.escalations = Counter(
            "catdog_cascade_escalations_total", "Cascade escalations.", ["small", "large"], registry=r
        )
        self.degraded = Counter(
            "catdog_degraded_total",
            "Answers given without escalation for lack of time.",
            ["mode"],
            registry=r,
        )
        self.confidence = Histogram(
            "catdog_confidence",
            "Calibrated top probability.",
            ["model"],
            buckets=_CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.budget_misses = Counter(
            "catdog_budget_misses_total", "Requests slower than their budget.", ["model"], registry=r
        )

        self.cache = CacheMetrics(
            lookups=Counter(
                "catdog_cache_lookups_total",
                "Response cache lookups, per image.",
                ["model", "result"],
                registry=r,
            ),
            evictions=Counter(
                "catdog_cache_evictions_total",
                "Answers evicted, by the bound that forced it.",
                ["reason"],
                registry=r,
            ),
            entries=Gauge("catdog_cache_entries", "Answers in the response cache.", registry=r),
            size_bytes=Gauge("catdog_cache_bytes", "Response cache size as accounted, in bytes.", registry=r),
        )

        self.shadow = ShadowMetrics(
            comparisons=Counter(
                "catdog_shadow_comparisons_total",
                "Small-model answers sampled for a background check by the large model, by outcome.",
                ["small", "large", "outcome"],
                registry=r,
            ),
            disagreement_confidence=Histogram(
                "catdog_shadow_disagreement_confidence",
                "The small model's calibrated confidence on answers the large model disagreed with.",
                ["small"],
                buckets=_CONFIDENCE_BUCKETS,
                registry=r,
            ),
            expected_agreement=Gauge(
                "catdog_shadow_expected_agreement",
                "Least agreement the build's per-source test accuracies allow (1 - both errors).",
                ["small", "large"],
                registry=r,
            ),
        )

    def responses_by_outcome(self) -> dict[str, int]:
        """Classification responses counted so far, as {"<outcome> <status class>": count}: logged
        at shutdown, so a drain can be checked against what clients received."""
        totals: collections.Counter[str] = collections.Counter()
        for family in self.requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):  # summed over models
                    totals[f"{sample.labels['outcome']} {sample.labels['status_class']}"] += int(sample.value)
        return dict(totals)
