"""The committed trained weights (fp16 .npz); their records are in model_export.records."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_weights(path: Path, weights: dict[str, np.ndarray]) -> None:
    """fp16 halves the repository cost; the build evaluates the rounded weights, not the originals."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {key.replace("/", "__"): value.astype(np.float16) for key, value in weights.items()}
    with path.open("wb") as handle:  # np.savez_compressed on a handle keeps the name as given
        np.savez_compressed(handle, **arrays)


def load_weights(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as saved:
        return {key.replace("__", "/"): saved[key].astype(np.float32) for key in saved.files}


def round_trip_fp16(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: value.astype(np.float16).astype(np.float32) for key, value in weights.items()}
