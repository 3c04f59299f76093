"""The int8 keep rule: a quantized variant stays only if it is as accurate everywhere and faster."""

from __future__ import annotations

import numpy as np
import pytest

from model_export.build import INT8_MAX_ACCURACY_DROP, int8_decision

LABELS = np.array([0, 1] * 500)
SOURCES = np.array(["web"] * 800 + ["kaggle"] * 200)


def logits_with_errors(wrong: np.ndarray) -> np.ndarray:
    """Logits that answer LABELS, except where `wrong` is set."""
    answer = np.where(wrong, 1 - LABELS, LABELS)
    logits = np.zeros((len(LABELS), 2), np.float32)
    logits[np.arange(len(LABELS)), answer] = 3.0
    return logits


FP32 = logits_with_errors(np.zeros(len(LABELS), bool))


def test_an_accurate_faster_variant_is_kept() -> None:
    decision = int8_decision(FP32, FP32.copy(), LABELS, SOURCES, fp_ms=10.0, q_ms=5.0)
    assert decision.kept and decision.speedup_batch1 == 2.0 and decision.worst_accuracy_drop == 0.0


def test_a_variant_that_loses_accuracy_on_one_source_is_dropped() -> None:
    # 2 errors on kaggle's 200 photos: 1 point there, only 0.2 points overall.
    wrong = np.zeros(len(LABELS), bool)
    wrong[-2:] = True
    decision = int8_decision(FP32, logits_with_errors(wrong), LABELS, SOURCES, fp_ms=10.0, q_ms=5.0)
    assert not decision.kept and "on a source" in decision.reason
    assert decision.worst_accuracy_drop == pytest.approx(0.01) and INT8_MAX_ACCURACY_DROP < 0.01


def test_a_variant_that_is_not_faster_is_dropped() -> None:
    decision = int8_decision(FP32, FP32.copy(), LABELS, SOURCES, fp_ms=10.0, q_ms=10.5)
    assert not decision.kept and "not faster" in decision.reason
