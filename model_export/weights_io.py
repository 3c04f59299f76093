"""The committed trained weights (fp16 .npz) and the training record (JSON) beside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from model_export.specs import TRAINING_RECORD


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


def read_record(path: Path = TRAINING_RECORD) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the trained weights are committed with the source; "
            "run `python -m model_export train --data DIR` to create them"
        )
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def write_record(record: dict[str, Any], path: Path = TRAINING_RECORD) -> None:
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
