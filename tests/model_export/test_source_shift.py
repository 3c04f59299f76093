"""Leave-one-source-out on synthetic features: a source unlike the others shows its cost."""

from __future__ import annotations

import numpy as np
import pytest

from model_export.cli import _parser
from model_export.source_shift import Split, fit_logistic, leave_one_source_out, table


def _photos(rng: np.random.Generator, n: int, source: str, signal_axis: int) -> Split:
    """Features where the label shows along one axis: sources A and B on axis 0, C on axis 1."""
    labels = rng.integers(0, 2, n)
    features = rng.normal(size=(n, 6))
    features[:, signal_axis] += 1.5 * (2 * labels - 1)
    return Split(features, labels, np.full(n, source))


def _split(rng: np.random.Generator, n: int) -> Split:
    parts = [_photos(rng, n, "A", 0), _photos(rng, n, "B", 0), _photos(rng, n, "C", 1)]
    return Split(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("features", "labels", "sources")))


def test_logistic_head_learns_a_separable_rule() -> None:
    rng = np.random.default_rng(0)
    split = _photos(rng, 400, "A", 0)
    head = fit_logistic(split, l2=1.0)
    assert head.accuracy(split) > 0.9
    assert head.log_loss(split) < 0.3
    probabilities = head.probabilities(np.array([[3.0, 0, 0, 0, 0, 0], [-3.0, 0, 0, 0, 0, 0]]))
    assert probabilities[0] > 0.95 > 0.05 > probabilities[1]


def test_an_unseen_source_unlike_the_others_loses_accuracy_and_one_like_them_does_not() -> None:
    rng = np.random.default_rng(1)
    shifts = {s.source: s for s in leave_one_source_out(_split(rng, 300), _split(rng, 100), _split(rng, 200))}
    assert set(shifts) == {"A", "B", "C"} and shifts["C"].n_images == 200
    # C's signal is on an axis A and B never use: without C in training, a head guesses there.
    assert shifts["C"].seen_accuracy > 0.75 and shifts["C"].unseen_accuracy < 0.6
    assert shifts["C"].unseen_log_loss > shifts["C"].seen_log_loss
    # B teaches everything A needs.
    assert shifts["A"].unseen_accuracy == pytest.approx(shifts["A"].seen_accuracy, abs=0.05)
    assert "C" in table("tiny", list(shifts.values()))


def test_the_command_line_takes_data_roots_and_models() -> None:
    args = _parser().parse_args(
        ["source-shift", "--data", "a", "b", "--models", "mobilenet", "--train-every", "2"]
    )
    assert args.command == "source-shift" and len(args.data) == 2
    assert args.models == ["mobilenet"] and args.train_every == 2
