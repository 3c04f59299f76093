"""Which training stage is kept: lower validation loss without losing accuracy where it counts."""

from __future__ import annotations

from model_export.train import StageResult


def stage(loss: float, accuracy: float, **by_source: float) -> StageResult:
    return StageResult("s", accuracy, loss, dict(by_source))


BASE = stage(0.06, 0.978, breed=0.971, kaggle=0.984, web=0.979)


def test_a_stage_that_lifts_the_hardest_source_is_kept_even_if_another_dips() -> None:
    assert stage(0.053, 0.980, breed=0.973, kaggle=0.981, web=0.984).improves_on(BASE)


def test_a_stage_that_lowers_the_hardest_source_is_refused() -> None:
    assert not stage(0.05, 0.981, breed=0.968, kaggle=0.99, web=0.99).improves_on(BASE)


def test_a_stage_with_higher_loss_or_lower_overall_accuracy_is_refused() -> None:
    assert not stage(0.061, 0.99, breed=0.99, kaggle=0.99, web=0.99).improves_on(BASE)
    assert not stage(0.05, 0.977, breed=0.975, kaggle=0.98, web=0.975).improves_on(BASE)
