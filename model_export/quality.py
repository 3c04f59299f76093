"""Quality figures (accuracy, log loss, ECE), temperature scaling and cascade thresholds."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from catdog_core.probabilities import softmax


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return float(-np.mean(np.log(picked)))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins (Guo et al., 2017)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def ece_if_calibrated(
    probs: np.ndarray, bins: int = 15, draws: int = 2000, seed: int = 0, block_photos: int = 4_000_000
) -> tuple[float, float]:
    """(median, 95th percentile) of the ECE that a perfectly calibrated model with these very
    confidences would measure on this many photos.

    The binned ECE is never 0 on a finite set, even for a calibrated model: with a few hundred
    photos at 99 % confidence, one or two mistakes more or fewer move it by most of a point. This
    is the noise floor, by consistency resampling (Bröcker and Smith, 2007): draw each photo's
    correctness from its own confidence `draws` times and measure the ECE of each draw, with the
    same bins as expected_calibration_error. A measured ECE above the 95th percentile is
    miscalibration the photos can show; one below it is not evidence of any.
    """
    confidence = probs.max(axis=1)
    if len(confidence) == 0:
        return 0.0, 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    # The bin i with edges[i] < confidence <= edges[i + 1], as in expected_calibration_error.
    bin_of = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    in_bin = np.zeros((len(confidence), bins))
    in_bin[np.arange(len(confidence)), bin_of] = 1.0
    expected = confidence @ in_bin
    rng = np.random.default_rng(seed)
    # Draws in blocks of about `block_photos` photos' worth (32 MB as floats), whatever the set's
    # size; the generator's stream is the same as one call's, so the figures do not depend on it.
    block = max(1, block_photos // len(confidence))
    eces = []
    for start in range(0, draws, block):
        correct = rng.random((min(block, draws - start), len(confidence))) < confidence
        # Each bin's |sum(correct) - sum(confidence)| / n is its share of the ECE (weight x gap).
        eces.append(np.abs(correct.astype(float) @ in_bin - expected).sum(axis=1) / len(confidence))
    median, p95 = np.percentile(np.concatenate(eces), [50, 95])
    return float(median), float(p95)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, prior_sigma: float = 0.5) -> float:
    """Temperature scaling as a MAP estimate: validation NLL plus a log-normal prior around T = 1.

    Plain maximum likelihood breaks down when validation is perfectly separated (a strong model on
    a few hundred photos): NLL then falls forever as T -> 0 and the "calibrated" model becomes
    absurdly overconfident. The prior (log T ~ N(0, prior_sigma^2), i.e. T within about x/÷ e^0.5)
    only matters when the data say almost nothing; with real evidence of miscalibration the
    likelihood dominates. Golden-section search on log T in [-3, 3] finds the optimum.
    """
    lo, hi = -3.0, 3.0
    ratio = (np.sqrt(5) - 1) / 2
    prior_weight = 1.0 / (2 * prior_sigma**2 * max(1, len(labels)))

    def nll(log_t: float) -> float:
        return log_loss(softmax(logits, float(np.exp(log_t))), labels) + prior_weight * log_t**2

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(np.exp((lo + hi) / 2))


@dataclass(frozen=True)
class Quality:
    accuracy: float
    log_loss: float
    ece: float
    ece_uncalibrated: float
    n_images: int
    ece_if_calibrated_median: float
    ece_if_calibrated_p95: float


def quality(logits: np.ndarray, labels: np.ndarray, temperature: float) -> Quality:
    calibrated = softmax(logits, temperature)
    raw = softmax(logits)
    median, p95 = ece_if_calibrated(calibrated)
    return Quality(
        accuracy=float((calibrated.argmax(1) == labels).mean()) if len(labels) else 0.0,
        log_loss=log_loss(calibrated, labels),
        ece=expected_calibration_error(calibrated, labels),
        ece_uncalibrated=expected_calibration_error(raw, labels),
        n_images=len(labels),
        ece_if_calibrated_median=median,
        ece_if_calibrated_p95=p95,
    )


@dataclass(frozen=True)
class CascadeChoice:
    threshold: float
    escalation_rate: float
    accuracy: float
    large_accuracy: float
    floor: float  # the threshold can never go below this (see choose_cascade_threshold)
    rule_threshold: float  # what the accuracy rule and the floor alone ask, before the budget


def cascade_outcome(
    small_probs: np.ndarray, large_probs: np.ndarray, labels: np.ndarray, threshold: float
) -> tuple[float, float]:
    """(accuracy, escalation rate) of: answer with small unless its confidence < threshold."""
    escalate = small_probs.max(axis=1) < threshold
    predictions = np.where(escalate, large_probs.argmax(1), small_probs.argmax(1))
    return float((predictions == labels).mean()), float(escalate.mean())


def choose_cascade_threshold(
    small_probs: np.ndarray,
    large_probs: np.ndarray,
    labels: np.ndarray,
    sources: np.ndarray | None = None,
    tolerance: float = 0.001,
    escalation_budget: float = 0.0,
) -> CascadeChoice:
    """The lowest escalation rate whose cascade accuracy is within `tolerance` of the large model's
    overall and on every source, but never below the point where the small model is less likely
    right than the large one, and raised to escalate up to `escalation_budget` of the photos.

    The budget is there because validation cannot resolve the tolerance: with ~420 photos per
    source one photo is 0.24 point, so a threshold that meets the rule on validation has no margin
    for the next source's confident mistakes. Escalating the least confident answers up to what
    the compute budget pays for buys that margin; the accuracy rule wins if it needs more.

    The accuracy rule alone is blind when the small model makes no mistake on the validation photos
    (it then never escalates, and the first hard photo is answered by a guessing small model). So
    the threshold is at least 1 - e, where e = (errors + 1) / (n + 2) is the large model's
    Laplace-smoothed validation error rate: with calibrated probabilities, an image whose small-
    model confidence is below that is more likely to be answered right by the large model.
    Candidates are the small model's own confidences (plus 0 and just above 1); escalation grows
    with the threshold, so the first candidate meeting the accuracy rule is the cheapest.
    """
    groups = [np.ones(len(labels), bool)]
    if sources is not None:
        groups += [sources == source for source in np.unique(sources)]
    large_correct = large_probs.argmax(1) == labels
    floor = 1.0 - (float((~large_correct).sum()) + 1.0) / (len(labels) + 2.0)
    candidates = np.concatenate([[0.0], np.unique(small_probs.max(axis=1)), [np.nextafter(1.0, 2.0)]])
    for candidate in candidates:
        threshold = float(min(max(candidate, floor), 1.0))
        escalate = small_probs.max(axis=1) < threshold
        correct = np.where(escalate, large_correct, small_probs.argmax(1) == labels)
        if all(correct[g].mean() >= large_correct[g].mean() - tolerance - 1e-12 for g in groups):
            return _with_budget(small_probs, large_probs, labels, threshold, floor, escalation_budget)
    raise AssertionError("escalating everything always reaches the large model's accuracy")


def _with_budget(
    small_probs: np.ndarray,
    large_probs: np.ndarray,
    labels: np.ndarray,
    rule_threshold: float,
    floor: float,
    escalation_budget: float,
) -> CascadeChoice:
    """The rule's threshold, raised to the highest that escalates at most `escalation_budget` of
    the photos (the confidence of the first photo past the budget: it and those above stay)."""
    confidences = np.sort(small_probs.max(axis=1))
    affordable = int(np.floor(escalation_budget * len(confidences) + 1e-9))
    if affordable == 0:
        budget_threshold = 0.0
    elif affordable < len(confidences):
        budget_threshold = float(confidences[affordable])
    else:
        budget_threshold = 1.0
    threshold = max(rule_threshold, budget_threshold)
    accuracy, rate = cascade_outcome(small_probs, large_probs, labels, threshold)
    large_accuracy = float((large_probs.argmax(1) == labels).mean())
    return CascadeChoice(threshold, rate, accuracy, large_accuracy, floor, rule_threshold)
