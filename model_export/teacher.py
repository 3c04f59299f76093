"""Distillation: a built classifier's calibrated probabilities as part of a smaller model's targets.

MobileNet answers the breed and Kaggle photos less well than Xception (test: 97.6 against 100 % on
breed photos), and a hard label says nothing about how cat-like a given dog looks. Xception's
probabilities on the very same augmented view do: training MobileNet towards a blend of the label
and the teacher's answer on each view ("a good teacher is patient and consistent", Beyer et al.,
2022) passes on what Xception learnt from its larger trunk.

The teacher is an ONNX model from a build (`build/teacher/xception-int8.onnx` in `make train`: its
int8 file answers like its fp32 one on validation at a third of the cost), read with its manifest
temperature so the probabilities it hands on are calibrated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catdog_core.hashing import sha256_file
from catdog_core.probabilities import softmax
from catdog_core.sessions import cpu_session, run_batches
from model_export.evaluate import Member
from service.manifest import load_manifest


@dataclass(frozen=True)
class Teacher:
    """A built model to distil from: what evaluation knows of it, and its file's digest (part of
    the feature cache's key, since its answers are cached with the features)."""

    member: Member
    sha256: str

    @classmethod
    def from_build(cls, model_file: Path) -> Teacher:
        """The model in `model_file`, with the temperature its build's manifest gives it."""
        manifest_path = model_file.parent / "manifest.json"
        if not model_file.exists() or not manifest_path.exists():
            raise FileNotFoundError(
                f"teacher {model_file} (and manifest.json beside it) missing: run `make models` "
                "first; an int8 variant that lost accuracy is left out of the build, so name its "
                "fp32 model instead"
            )
        manifest = load_manifest(manifest_path)
        entry = next((e for e in manifest.models.values() if e.file == model_file.name), None)
        if entry is None:
            raise ValueError(f"{model_file.name} is not a model of {manifest_path}")
        digest = sha256_file(model_file)
        if digest != entry.sha256:
            raise ValueError(f"{model_file} does not match its manifest's sha256: rebuild it")
        return cls(Member(entry.name, model_file, entry.input.width, entry.temperature), digest)

    def predictor(self, threads: int = 2) -> Callable[[np.ndarray], np.ndarray]:
        """Calibrated probabilities (float32) for uint8 NHWC images at the teacher's input size."""
        session = cpu_session(self.member.path, threads)
        temperature = self.member.temperature
        return lambda images: softmax(run_batches(session, images), temperature).astype(np.float32)


def one_hot(labels: np.ndarray, n_labels: int) -> np.ndarray:
    return np.eye(n_labels, dtype=np.float32)[labels]


def blended_targets(
    labels: np.ndarray, n_labels: int, teacher_probs: np.ndarray | None, weight: float
) -> np.ndarray:
    """(1 - weight) x one-hot label + weight x teacher probabilities, per view.

    Cross-entropy against this blend is the label's loss plus the teacher's (Hinton's distillation
    loss at temperature 1) in one term; weight 0 is plain training on the labels.
    """
    onehot = one_hot(labels, n_labels)
    if weight == 0:
        return onehot
    if teacher_probs is None:
        raise ValueError("a distilled run needs the teacher's probabilities for every view")
    if teacher_probs.shape != onehot.shape:
        raise ValueError(f"teacher probabilities {teacher_probs.shape} for labels {onehot.shape}")
    return (1 - weight) * onehot + weight * teacher_probs.astype(np.float32)
