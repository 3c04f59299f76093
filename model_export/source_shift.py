"""What a photo source never seen in training costs: leave one source out, head only.

The build's figures are measured on a split of the same sources the models were trained on, but
users send photos from others. This estimates the difference from the data we have: for each
source, a logistic head on frozen ImageNet features (the backbone's pooled output, original view
only, no fine-tuning) is trained once on every source and once on all but that one, and both are
measured on that source's test photos. The gap between the two is what an unseen source cost that
simple model; the shipped models are fine-tuned and distilled, so read it as a size, not a
prediction to the photo (README, "Which figure to trust").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from catdog_core.sessions import cpu_session, run_batches
from model_export import onnx_tools
from model_export.data import Sample, load_images, stratified_split
from model_export.specs import LABELS, SPECS_BY_NAME

L2_GRID = (1.0, 10.0, 100.0, 1000.0)


@dataclass(frozen=True)
class Split:
    """Pooled features, labels (0/1) and sources of one split's photos."""

    features: np.ndarray
    labels: np.ndarray
    sources: np.ndarray

    def where(self, mask: np.ndarray) -> Split:
        return Split(self.features[mask], self.labels[mask], self.sources[mask])


@dataclass(frozen=True)
class LogisticHead:
    """P(label 1) = sigmoid(w . standardised(x) + b)."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray  # the bias last

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(z @ self.weights[:-1] + self.weights[-1])))

    def accuracy(self, split: Split) -> float:
        return float(((self.probabilities(split.features) > 0.5) == split.labels).mean())

    def log_loss(self, split: Split) -> float:
        p = np.clip(self.probabilities(split.features), 1e-7, 1 - 1e-7)
        y = split.labels
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_logistic(split: Split, l2: float, iterations: int = 50) -> LogisticHead:
    """L2-regularised logistic regression by Newton's method (the bias is not penalised).

    Exact and deterministic in a few iterations for a thousand features: no optimiser settings
    to tune between the runs being compared."""
    mean = split.features.mean(axis=0)
    scale = split.features.std(axis=0) + 1e-6
    z = np.hstack([(split.features - mean) / scale, np.ones((len(split.labels), 1))])
    penalty = l2 * np.r_[np.ones(z.shape[1] - 1), 0.0]
    w = np.zeros(z.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        gradient = z.T @ (p - split.labels) + penalty * w
        hessian = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return LogisticHead(mean, scale, w)


def fit_chosen_on_val(train: Split, val: Split) -> LogisticHead:
    """The head whose L2 strength gave the lowest validation log loss."""
    return min((fit_logistic(train, l2) for l2 in L2_GRID), key=lambda head: head.log_loss(val))


@dataclass(frozen=True)
class SourceShift:
    """One source's test photos, by a head trained with it (seen) and without it (unseen)."""

    source: str
    n_images: int
    seen_accuracy: float
    unseen_accuracy: float
    seen_log_loss: float
    unseen_log_loss: float


def leave_one_source_out(train: Split, val: Split, test: Split) -> list[SourceShift]:
    seen_head = fit_chosen_on_val(train, val)
    shifts = []
    for source in sorted(set(test.sources.tolist())):
        others = fit_chosen_on_val(train.where(train.sources != source), val.where(val.sources != source))
        mine = test.where(test.sources == source)
        shifts.append(
            SourceShift(
                source,
                len(mine.labels),
                seen_head.accuracy(mine),
                others.accuracy(mine),
                seen_head.log_loss(mine),
                others.log_loss(mine),
            )
        )
    return shifts


def pooled_features_onnx(name: str, cache_dir: Path) -> Path:
    """uint8 image -> the ImageNet backbone's pooled features (exported once, cached)."""
    import keras

    from model_export.files import whole_or_nothing
    from model_export.keras_models import load_base

    spec = SPECS_BY_NAME[name]
    path = cache_dir / "trunks" / f"{spec.family}-{spec.input_size}-pooled.onnx"
    if not path.exists():
        base, _ = load_base(spec, cache_dir)
        image = keras.Input((spec.input_size, spec.input_size, 3), dtype="uint8", name="image")
        scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(image)
        pooled = keras.layers.GlobalAveragePooling2D()(base(scaled))
        with whole_or_nothing(path) as partial:
            onnx_tools.export_keras(keras.Model(image, pooled), partial)
    return path


def features_of(samples: list[Sample], size: int, session: ort.InferenceSession, desc: str) -> Split:
    loaded = load_images(samples, size, f"{desc}: decoding")
    pooled = run_batches(
        session, loaded.arrays, progress=lambda starts: tqdm(starts, desc=f"{desc}: features", unit="batch")
    )
    return Split(pooled.astype(np.float64), np.asarray(loaded.labels), np.asarray(loaded.sources))


def measure(
    name: str, data: Sequence[Path], seed: int, cache_dir: Path, threads: int, train_every: int = 1
) -> list[SourceShift]:
    """Leave-one-source-out on the documented split of `data` with `name`'s ImageNet backbone
    (every train_every-th training photo: Xception's features cost ten times MobileNet's)."""
    if len(LABELS) != 2:
        raise ValueError("the logistic head is binary")
    spec = SPECS_BY_NAME[name]
    session = cpu_session(pooled_features_onnx(name, cache_dir), threads)
    samples = stratified_split(list(data), seed).samples
    train, val, test = (
        features_of(samples[split][::step], spec.input_size, session, f"{name} {split}")
        for split, step in (("train", train_every), ("val", 1), ("test", 1))
    )
    return leave_one_source_out(train, val, test)


def table(name: str, shifts: list[SourceShift]) -> str:
    lines = [
        f"{name}: test photos of each source, head trained with / without that source (accuracy %, log loss)",
        f"{'source':24s} {'photos':>6s} {'seen':>7s} {'unseen':>7s} {'change':>7s} "
        f"{'ll seen':>8s} {'ll unseen':>9s}",
    ]
    for s in shifts:
        seen, unseen = 100 * s.seen_accuracy, 100 * s.unseen_accuracy
        lines.append(
            f"{s.source:24s} {s.n_images:6d} {seen:7.2f} {unseen:7.2f} {unseen - seen:+7.2f} "
            f"{s.seen_log_loss:8.4f} {s.unseen_log_loss:9.4f}"
        )
    return "\n".join(lines)
