"""The Keras models the build starts from: a pretrained backbone from its pinned source, and the
classifier with the committed trained weights on top (the reference for fp32 parity)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model_export import backbones, sources
from model_export.specs import LABELS, ModelSpec
from model_export.weights_io import load_weights


def load_base(spec: ModelSpec, cache_dir: Path, size: int | None = None) -> tuple[Any, sources.Artifact]:
    """The ImageNet-pretrained base of the spec's family from its pinned source (fetched once), for
    `size` x `size` images (default: the training resolution; the weights fit any size)."""
    artifact = sources.ARTIFACTS[sources.DEFAULT_SOURCES[spec.family]]
    base = backbones.pretrained_base(artifact, sources.fetch(artifact, cache_dir), size or spec.input_size)
    return base, artifact


def load_backbone(
    spec: ModelSpec, cache_dir: Path, size: int | None = None
) -> tuple[backbones.Backbone, sources.Artifact]:
    base, artifact = load_base(spec, cache_dir, size)
    return backbones.split_backbone(spec.family, base, size or spec.input_size), artifact


def keras_classifier(
    spec: ModelSpec, cache_dir: Path, size: int | None = None
) -> tuple[Any, sources.Artifact]:
    """The trained classifier at `size` (default: the training resolution)."""
    backbone, artifact = load_backbone(spec, cache_dir, size)
    head = backbones.top_model(backbone, len(LABELS))
    backbones.apply_weights(head, load_weights(spec.weights_file))
    return backbones.classifier(backbone, head, spec.name), artifact
