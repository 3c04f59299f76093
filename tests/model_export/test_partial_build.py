"""`build --only`: the teacher build `make train` needs before the MobileNets are trained."""

from __future__ import annotations

import pytest

from model_export.build import _chosen_specs
from model_export.specs import DEFAULT_MODEL, MODEL_SPECS


def test_no_selection_builds_every_model() -> None:
    assert _chosen_specs(None) == list(MODEL_SPECS)


def test_a_selection_builds_those_models_in_build_order() -> None:
    names = [spec.name for spec in MODEL_SPECS]
    chosen = _chosen_specs([names[-1], DEFAULT_MODEL])
    assert [spec.name for spec in chosen] == [n for n in names if n in {names[-1], DEFAULT_MODEL}]


def test_an_unknown_name_is_refused_not_ignored() -> None:
    with pytest.raises(ValueError, match="mobilnet: not a model"):
        _chosen_specs([DEFAULT_MODEL, "mobilnet"])


def test_a_selection_without_the_default_model_is_refused() -> None:
    others = [spec.name for spec in MODEL_SPECS if spec.name != DEFAULT_MODEL]
    with pytest.raises(ValueError, match="default model"):
        _chosen_specs(others)
