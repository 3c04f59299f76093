"""Choosing for the caller: pure decisions, no I/O, so each rule is testable on its own.

`auto` picks the most accurate model whose *predicted* latency fits the caller's budget, where
the prediction is live: the median of recent measured decode and inference times on this server
plus the wait for the shared inference lane (this model's whole queue, and one batch of every
other busy model: see ModelRegistry.backlog_seconds). As load grows the wait grows, and auto
moves to cheaper models by itself.

`cascade` answers with the small model unless its calibrated confidence is below the threshold
chosen at build time; then it pays for the large model, if the deadline leaves time for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import Unsatisfiable


@dataclass(frozen=True)
class Candidate:
    name: str
    # The lowest per-source test accuracy from the manifest (QualityFigures.hardest_source); None when not
    # measured. A caller asking for 99 % should get it on the hardest kind of photo the build saw.
    accuracy: float | None
    predicted_ms: float


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    reason: str  # a small fixed set: it is a metric label


def choose_auto(
    candidates: list[Candidate], max_latency_ms: float | None, min_accuracy: float | None
) -> Choice:
    """The most accurate candidate within both constraints (faster wins a tie)."""
    accurate = [c for c in candidates if min_accuracy is None or (c.accuracy or 0.0) >= min_accuracy]
    fitting = [c for c in accurate if max_latency_ms is None or c.predicted_ms <= max_latency_ms]
    if fitting:
        best = max(fitting, key=lambda c: (c.accuracy or 0.0, -c.predicted_ms))
        most_accurate = max(candidates, key=lambda c: (c.accuracy or 0.0, -c.predicted_ms))
        reason = "most_accurate" if best.name == most_accurate.name else "latency_budget"
        return Choice(best, reason)
    raise Unsatisfiable(_explain(candidates, accurate, max_latency_ms, min_accuracy))


def _explain(
    candidates: list[Candidate],
    accurate: list[Candidate],
    max_latency_ms: float | None,
    min_accuracy: float | None,
) -> str:
    fastest = min(candidates, key=lambda c: c.predicted_ms)
    best = max(candidates, key=lambda c: c.accuracy or 0.0)
    figures = (
        f"most accurate: {best.name} {100 * (best.accuracy or 0):.2f} % at ~{best.predicted_ms:.0f} ms; "
        f"fastest: {fastest.name} ~{fastest.predicted_ms:.0f} ms at {100 * (fastest.accuracy or 0):.2f} %"
    )
    if not accurate:
        return f"no model reaches min_accuracy={min_accuracy}; {figures}"
    quickest_accurate = min(accurate, key=lambda c: c.predicted_ms)
    return (
        f"no model with accuracy >= {min_accuracy or 0} fits max_latency_ms={max_latency_ms} now "
        f"(the quickest that does, {quickest_accurate.name}, "
        f"needs ~{quickest_accurate.predicted_ms:.0f} ms); "
        f"{figures}"
    )


def needs_escalation(confidence: float, threshold: float) -> bool:
    """Escalate exactly when the small model's calibrated top probability is below the threshold."""
    return confidence < threshold
