"""Temperature scaling, ECE and the cascade threshold on data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from model_export.quality import (
    cascade_outcome,
    choose_cascade_threshold,
    ece_if_calibrated,
    expected_calibration_error,
    fit_temperature,
    log_loss,
    softmax,
)


def test_temperature_recovers_a_known_overconfidence() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (4000, 2))
    labels = np.array([rng.choice(2, p=p) for p in softmax(true_logits)])
    overconfident = true_logits * 3  # the model is 3x too sure of itself
    temperature = fit_temperature(overconfident, labels)
    assert 2.5 < temperature < 3.5
    assert log_loss(softmax(overconfident, temperature), labels) < log_loss(softmax(overconfident), labels)
    assert expected_calibration_error(
        softmax(overconfident, temperature), labels
    ) < expected_calibration_error(softmax(overconfident), labels)


def test_separable_validation_does_not_drive_the_temperature_to_zero() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 500)
    logits = np.where(labels[:, None] == np.arange(2), 6.0, -6.0) + rng.normal(0, 0.5, (500, 2))
    temperature = fit_temperature(logits, labels)  # every prediction right: NLL alone wants T -> 0
    assert 0.3 < temperature <= 1.0


def test_ece_is_zero_for_perfect_confident_predictions() -> None:
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, np.array([0, 1])) == 0.0


def _confident_model(n: int, seed: int) -> np.ndarray:
    """Probabilities of a strong model: most answers at 0.97-1.0, a few unsure ones."""
    rng = np.random.default_rng(seed)
    top = np.where(rng.random(n) < 0.9, rng.uniform(0.97, 1.0, n), rng.uniform(0.5, 0.97, n))
    return np.stack([top, 1 - top], axis=1)


def test_the_ece_of_a_calibrated_model_lies_within_its_noise_floor() -> None:
    probs = _confident_model(374, seed=2)
    median, p95 = ece_if_calibrated(probs)
    assert 0 < median < p95
    rng = np.random.default_rng(3)
    # Labels drawn from the model's own confidences: a perfectly calibrated model, 200 test sets.
    eces = [
        expected_calibration_error(probs, np.where(rng.random(374) < probs[:, 0], 0, 1)) for _ in range(200)
    ]
    assert median == pytest.approx(np.median(eces), rel=0.15)
    assert 0.02 < np.mean(np.array(eces) > p95) < 0.10


def test_the_noise_floor_falls_with_more_photos_and_an_overconfident_model_rises_above_it() -> None:
    few = ece_if_calibrated(_confident_model(300, seed=4))
    many = ece_if_calibrated(_confident_model(3000, seed=4))
    assert many[1] < few[1] / 2
    probs = _confident_model(3000, seed=5)
    rng = np.random.default_rng(6)
    # The truth is less sure than the model: each answer right with probability 2 * top - 1.
    labels = np.where(rng.random(3000) < 2 * probs[:, 0] - 1, 0, 1)
    assert expected_calibration_error(probs, labels) > 3 * ece_if_calibrated(probs)[1]


def test_the_noise_floor_is_drawn_in_bounded_blocks_without_changing_it() -> None:
    probs = _confident_model(2000, seed=7)
    assert ece_if_calibrated(probs, block_photos=10_000) == ece_if_calibrated(probs, block_photos=10**9)


def test_cascade_threshold_is_the_cheapest_that_matches_the_large_model() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    small = np.array([[0.99, 0.01], [0.6, 0.4], [0.45, 0.55], [0.7, 0.3], [0.98, 0.02], [0.2, 0.8]])
    large = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])
    choice = choose_cascade_threshold(small, large, labels, tolerance=0.0)
    # Accuracy alone needs only the 0.7-confident mistake escalated (threshold just above 0.7), but
    # the floor (1 - 1/8 = 0.875: no large-model errors in 6 photos) raises the threshold to it.
    assert choice.floor == 1 - 1 / 8
    assert choice.accuracy == choice.large_accuracy == 1.0
    accuracy, rate = cascade_outcome(small, large, labels, choice.threshold)
    assert accuracy == 1.0 and rate == choice.escalation_rate
    assert rate == 4 / 6 and choice.threshold == 0.875  # 0.6, 0.55, 0.7 and 0.8 are below it


def test_cascade_escalates_unsure_images_even_when_validation_has_no_errors() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 998)
    confident = np.where(labels[:, None] == np.arange(2), 0.9995, 0.0005)
    small = confident.copy()
    small[:20] = np.where(labels[:20, None] == np.arange(2), 0.6, 0.4)  # right, but unsure
    choice = choose_cascade_threshold(small, confident, labels)
    assert choice.floor == pytest.approx(1 - 1 / 1000)
    assert choice.threshold >= choice.floor
    escalated = small.max(axis=1) < choice.threshold
    assert escalated[:20].all() and not escalated[20:].any()


def test_cascade_never_escalates_a_small_model_surer_than_the_floor() -> None:
    labels = np.array([0, 1])
    probs = np.array([[0.9999, 0.0001], [0.0001, 0.9999]])
    choice = choose_cascade_threshold(probs, probs, labels)
    assert choice.escalation_rate == 0.0


def test_cascade_threshold_holds_on_every_source_not_only_overall() -> None:
    # The large model is always right. The small one is right everywhere except one photo of
    # source "b", where it is wrong with confidence 0.9995: 1 error in 1000 passes the 0.1-point
    # rule overall, but it is 1 % of source b's 100 photos.
    n_a, n_b = 900, 100
    labels = np.zeros(n_a + n_b, dtype=np.int64)
    sources = np.array(["a"] * n_a + ["b"] * n_b)
    small = np.tile([0.99995, 0.00005], (n_a + n_b, 1))
    small[-1] = [0.0005, 0.9995]
    large = np.tile([0.9, 0.1], (n_a + n_b, 1))
    overall_only = choose_cascade_threshold(small, large, labels)
    assert overall_only.threshold <= 0.9995
    per_source = choose_cascade_threshold(small, large, labels, sources)
    assert 0.9995 < per_source.threshold <= 0.99995
    accuracy, rate = cascade_outcome(small, large, labels, per_source.threshold)
    assert accuracy == 1.0 and rate == pytest.approx(1 / 1000)


def test_cascade_spends_its_escalation_budget_on_the_least_confident_answers() -> None:
    # The small model is right on all 100 photos, at confidences 0.99900 ... 0.99999: the rule
    # (floor 1 - 1/102 = 0.990) escalates none, so a 0.2 budget escalates the 20 least confident.
    labels = np.zeros(100, dtype=np.int64)
    confidence = np.linspace(0.999, 0.99999, 100)
    small = np.stack([confidence, 1 - confidence], axis=1)
    large = np.tile([0.9, 0.1], (100, 1))
    rule_only = choose_cascade_threshold(small, large, labels)
    assert rule_only.escalation_rate == 0.0 and rule_only.rule_threshold == rule_only.threshold
    spent = choose_cascade_threshold(small, large, labels, escalation_budget=0.2)
    assert spent.rule_threshold == rule_only.threshold
    assert spent.threshold == confidence[20] and spent.escalation_rate == 0.2
    escalated = small.max(axis=1) < spent.threshold
    assert escalated[:20].all() and not escalated[20:].any()


def test_the_accuracy_rule_escalates_past_a_smaller_budget() -> None:
    # Ten wrong answers at 0.95 must go to the large model whatever the budget says.
    labels = np.zeros(100, dtype=np.int64)
    small = np.tile([0.9999, 0.0001], (100, 1))
    small[:10] = [0.05, 0.95]
    large = np.tile([0.9, 0.1], (100, 1))
    choice = choose_cascade_threshold(small, large, labels, escalation_budget=0.05)
    assert choice.threshold == choice.rule_threshold
    assert choice.escalation_rate == 0.1 and choice.accuracy == 1.0


def test_a_budget_for_every_photo_escalates_every_photo_below_certainty() -> None:
    labels = np.zeros(4, dtype=np.int64)
    small = np.array([[0.999, 0.001], [0.9999, 0.0001], [0.99999, 0.00001], [0.999999, 0.000001]])
    choice = choose_cascade_threshold(small, small, labels, escalation_budget=1.0)
    assert choice.escalation_rate == 1.0


def test_metrics_are_reported_per_source() -> None:
    from model_export.evaluate import metrics

    labels = np.array([0, 1, 0, 1, 0, 1])
    sources = np.array(["a", "a", "a", "b", "b", "b"])
    logits = np.where(labels[:, None] == 0, [4.0, -4.0], [-4.0, 4.0])  # every answer right
    logits[4] = [-4.0, 4.0]  # a: all three right; b: its class-0 photo answered 1
    result = metrics(logits, labels, 1.0, "test", sources)
    assert result.by_source["a"].accuracy == 1.0 and result.by_source["a"].n_images == 3
    assert result.by_source["b"].accuracy == pytest.approx(2 / 3)
    assert result.accuracy == pytest.approx(5 / 6)
    assert result.hardest_source == ("b", pytest.approx(2 / 3))
