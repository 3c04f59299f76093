"""Measuring built ONNX files on a dataset: per-model quality and the cascade.

Used by `build --data` and by `evaluate`, which re-measures an existing build (on the documented
split, or on every photo of another ImageFolder, such as an independent test set).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catdog_core.probabilities import softmax
from catdog_core.sessions import CPU, OpenVinoPrecision, cpu_session, run_batches
from model_export.data import Sample, all_samples, load_images, stratified_split
from model_export.quality import (
    Quality,
    choose_cascade_threshold,
    quality,
)
from model_export.specs import CASCADE_COMPUTE_BUDGET
from service.manifest import (
    CascadeEntry,
    CascadeSourceFigures,
    Manifest,
    ModelEntry,
    QualityFigures,
    SourceQuality,
    load_manifest,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """What evaluation needs of one model: where its file is and how it reads images."""

    name: str
    path: Path
    size: int
    temperature: float


def logits_on(
    path: Path, images: np.ndarray, provider: str = CPU, precision: OpenVinoPrecision = "fp32"
) -> np.ndarray:
    return run_batches(cpu_session(path, 2, provider, precision), images)


def metrics(
    logits: np.ndarray, labels: np.ndarray, temperature: float, split: str, sources: np.ndarray | None = None
) -> QualityFigures:
    """Quality overall and, given each image's source, on each source's images."""
    q = quality(logits, labels, temperature)
    by_source = {}
    for source in np.unique(sources) if sources is not None else []:
        mine = sources == source
        by_source[str(source)] = SourceQuality(**_shared(quality(logits[mine], labels[mine], temperature)))
    return QualityFigures(split=split, ece_uncalibrated=q.ece_uncalibrated, by_source=by_source, **_shared(q))


def _shared(q: Quality) -> dict[str, Any]:
    """The figures a split and a source's photos both report (SourceQuality's fields)."""
    return {name: getattr(q, name) for name in SourceQuality.model_fields}


class Evaluation:
    """Images (decoded once per size) and logits (once per model) for named sample sets."""

    def __init__(
        self,
        sets: dict[str, list[Sample]],
        max_side: int | None = None,
        provider: str = CPU,
        precision: OpenVinoPrecision = "fp32",
    ) -> None:
        self.sets = sets
        self.max_side = max_side  # photos shrunk to this first (model_export.data.shrunk), if set
        self.provider = provider  # the onnxruntime provider that runs the models
        self.precision = precision  # OpenVINO's (catdog_core.sessions.openvino_options)
        self._images: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._sources: dict[str, np.ndarray] = {}
        self._logits: dict[tuple[str, str], np.ndarray] = {}

    def images(self, set_name: str, size: int) -> tuple[np.ndarray, np.ndarray]:
        if (set_name, size) not in self._images:
            loaded = load_images(self.sets[set_name], size, f"{set_name} images {size}px", self.max_side)
            self._images[(set_name, size)] = (loaded.arrays, loaded.labels)
            self._sources[set_name] = np.asarray(loaded.sources)
        return self._images[(set_name, size)]

    def sources(self, set_name: str) -> np.ndarray:
        """Each loaded image's source (after images() has loaded the set at some size)."""
        return self._sources[set_name]

    def logits(self, member: Member, set_name: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self.images(set_name, member.size)
        if (member.name, set_name) not in self._logits:
            self._logits[(member.name, set_name)] = logits_on(
                member.path, images, self.provider, self.precision
            )
        return self._logits[(member.name, set_name)], labels

    def probabilities(self, member: Member, set_name: str) -> tuple[np.ndarray, np.ndarray]:
        logits, labels = self.logits(member, set_name)
        return softmax(logits, member.temperature), labels

    def metrics(self, member: Member, set_name: str, split: str) -> QualityFigures:
        return metrics(*self.logits(member, set_name), member.temperature, split, self.sources(set_name))


def cascade_test_metrics(
    evaluation: Evaluation, small: Member, large: Member, threshold: float, set_name: str
) -> tuple[QualityFigures, float, dict[str, tuple[float, float, float, int]]]:
    """The cascade's own quality on a set, its escalation rate there, and per source
    (cascade accuracy, large model's accuracy, escalation rate, images)."""
    small_probs, labels = evaluation.probabilities(small, set_name)
    large_probs, _ = evaluation.probabilities(large, set_name)
    sources = evaluation.sources(set_name)
    escalate = small_probs.max(axis=1) < threshold
    probs = np.where(escalate[:, None], large_probs, small_probs)
    rate = float(escalate.mean())
    by_source = {}
    for source in np.unique(sources):
        mine = sources == source
        by_source[str(source)] = (
            float((probs[mine].argmax(1) == labels[mine]).mean()),
            float((large_probs[mine].argmax(1) == labels[mine]).mean()),
            float(escalate[mine].mean()),
            int(mine.sum()),
        )
    # The cascade's probabilities are already calibrated: temperature 1 on their logs.
    quality_ = metrics(np.log(np.clip(probs, 1e-300, 1.0)), labels, 1.0, "test", sources)
    return quality_, rate, by_source


def _source_figures(
    small: ModelEntry, large: ModelEntry, by_source: dict[str, tuple[float, float, float, int]]
) -> dict[str, CascadeSourceFigures]:
    return {
        source: CascadeSourceFigures(
            n_images=n,
            accuracy=acc,
            large_accuracy=large_acc,
            escalation_rate=rate,
            cost_ratio=cost_ratio(small, large, rate),
        )
        for source, (acc, large_acc, rate, n) in by_source.items()
    }


def cost_ratio(small: ModelEntry, large: ModelEntry, escalation_rate: float) -> float:
    """A cascade's mean compute per image relative to always running the large model.

    Counted in FLOPs rather than measured latency: exact, and the same on every machine.
    """
    return (small.flops + escalation_rate * large.flops) / large.flops


def measure_cascade(
    evaluation: Evaluation, small: ModelEntry, large: ModelEntry, small_m: Member, large_m: Member
) -> CascadeEntry:
    """Choose the threshold on val, then measure the cascade on the test set."""
    small_val, labels_val = evaluation.probabilities(small_m, "val")
    large_val, _ = evaluation.probabilities(large_m, "val")
    choice = choose_cascade_threshold(
        small_val,
        large_val,
        labels_val,
        evaluation.sources("val"),
        escalation_budget=max(0.0, CASCADE_COMPUTE_BUDGET - cost_ratio(small, large, 0.0)),
    )
    test, test_rate, by_source = cascade_test_metrics(evaluation, small_m, large_m, choice.threshold, "test")
    log.info(
        "cascade %s->%s: threshold %.4f (the accuracy rule's %.4f), val escalation %.3f; "
        "test accuracy %.4f, escalation %.3f, compute %.1f %% of %s",
        small.name,
        large.name,
        choice.threshold,
        choice.rule_threshold,
        choice.escalation_rate,
        test.accuracy,
        test_rate,
        100 * cost_ratio(small, large, test_rate),
        large.name,
    )
    return CascadeEntry(
        small=small.name,
        large=large.name,
        threshold=choice.threshold,
        escalation_rate_val=choice.escalation_rate,
        accuracy_val=choice.accuracy,
        expected_cost_ratio=cost_ratio(small, large, choice.escalation_rate),
        compute_budget=CASCADE_COMPUTE_BUDGET,
        rule_threshold=choice.rule_threshold,
        test=test,
        test_escalation_rate=test_rate,
        test_cost_ratio=cost_ratio(small, large, test_rate),
        test_by_source=_source_figures(small, large, by_source),
    )


def remeasure(
    manifest_path: Path,
    data: list[Path],
    all_images: bool,
    seed: int,
    max_side: int | None = None,
    provider: str = CPU,
    precision: OpenVinoPrecision = "fp32",
) -> Manifest:
    """The manifest with every figure measured again on `data`; thresholds are kept, never re-tuned.

    all_images: every photo under `data` is the test set (an independent collection); otherwise the
    documented split of `data` is used and val figures are refreshed too.
    max_side: shrink every photo to at most this many px first (model_export.data.shrunk), for
    figures on small photos.
    provider: the onnxruntime provider that runs the models (catdog_core.sessions.cpu_session),
    precision: OpenVINO's.
    """
    manifest = load_manifest(manifest_path)
    sets = {"test": all_samples(data)[1]} if all_images else stratified_split(data, seed).samples
    evaluation = Evaluation(sets, max_side, provider, precision)
    members = {
        n: Member(n, manifest.path_of(n, manifest_path), e.input.width, e.temperature)
        for n, e in manifest.models.items()
    }
    models = {
        name: entry.model_copy(
            update={
                "test": evaluation.metrics(members[name], "test", "test"),
                "val": entry.val if all_images else evaluation.metrics(members[name], "val", "val"),
            }
        )
        for name, entry in manifest.models.items()
    }
    cascades = []
    for c in manifest.cascades:
        test, rate, by_source = cascade_test_metrics(
            evaluation, members[c.small], members[c.large], c.threshold, "test"
        )
        cost = cost_ratio(models[c.small], models[c.large], rate)
        cascades.append(
            c.model_copy(
                update={
                    "test": test,
                    "test_escalation_rate": rate,
                    "test_cost_ratio": cost,
                    "test_by_source": _source_figures(models[c.small], models[c.large], by_source),
                }
            )
        )
    return manifest.model_copy(update={"models": models, "cascades": cascades})
