"""Logits to probabilities with the manifest's temperature: the build measures calibration with
this function and the service answers with it, so the two cannot drift apart."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, in float64; a 1-D input is one row."""
    scaled = np.atleast_2d(logits).astype(np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    probabilities: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return probabilities if logits.ndim > 1 else probabilities[0]
