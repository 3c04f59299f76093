"""The serving resolution: chosen on validation among a model's candidates, recorded, and what the
manifest then serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_export.build import EVALUATION_RECORD, _recorded_serving_size, choose_serving_size
from model_export.records import EvaluationRecord, ServingSizeTrial, read_evaluation_record
from model_export.specs import MODEL_SPECS, SPECS_BY_NAME, ModelSpec
from service.manifest import load_manifest
from tests.support import BUILT_MODELS


def trial(size: int, accuracy: float, worst: float, log_loss: float) -> ServingSizeTrial:
    return ServingSizeTrial(
        size=size,
        temperature=1.0,
        val_accuracy=accuracy,
        val_worst_source_accuracy=worst,
        val_log_loss=log_loss,
    )


def test_the_lowest_log_loss_wins_among_sizes_that_lose_no_accuracy() -> None:
    trials = [
        trial(224, 0.992, 0.989, 0.025),
        trial(256, 0.996, 0.992, 0.020),
        trial(288, 0.996, 0.992, 0.018),
    ]
    assert choose_serving_size(trials) == 288


def test_a_size_that_loses_accuracy_on_the_hardest_source_is_not_chosen() -> None:
    # Lower log loss and higher accuracy overall, but one source fell: calibration is no excuse.
    trials = [trial(160, 0.982, 0.979, 0.050), trial(192, 0.985, 0.975, 0.034)]
    assert choose_serving_size(trials) == 160


def test_the_training_resolution_stays_when_nothing_beats_it() -> None:
    trials = [trial(224, 0.992, 0.989, 0.025), trial(256, 0.992, 0.989, 0.027)]
    assert choose_serving_size(trials) == 224


def test_the_training_resolution_is_always_the_first_candidate() -> None:
    assert ModelSpec("m", "mobilenet_v1", 224, (256, 224, 288)).serving_sizes == (224, 256, 288)
    assert ModelSpec("x", "xception", 299).serving_sizes == (299,)
    for spec in MODEL_SPECS:
        assert spec.serving_sizes[0] == spec.input_size
        assert all(size >= spec.input_size for size in spec.serving_sizes), spec.name


def test_a_record_written_before_serving_sizes_still_reads(tmp_path: Path) -> None:
    payload = json.loads(EVALUATION_RECORD.read_text())
    for key in ("serving_sizes", "serving_size_trials"):
        payload.pop(key, None)
    old = tmp_path / "evaluation.json"
    old.write_text(json.dumps(payload))
    record = read_evaluation_record(old)
    assert record is not None and record.serving_sizes == {}  # the build then serves the training size


def test_a_data_free_build_serves_the_recorded_size_only_while_it_is_a_candidate() -> None:
    record = EvaluationRecord.model_validate_json(EVALUATION_RECORD.read_text())
    spec = ModelSpec("mobilenet", "mobilenet_v1", 224, (256, 288))
    assert (
        _recorded_serving_size(spec, record.model_copy(update={"serving_sizes": {"mobilenet": 256}})) == 256
    )
    # The spec no longer offers what was recorded: the training size, not a size nobody chose now.
    assert (
        _recorded_serving_size(spec, record.model_copy(update={"serving_sizes": {"mobilenet": 320}})) == 224
    )
    assert _recorded_serving_size(spec, record.model_copy(update={"serving_sizes": {}})) == 224
    assert _recorded_serving_size(spec, None) == 224


@pytest.mark.models
def test_the_manifest_serves_each_model_at_the_recorded_resolution() -> None:
    record = EvaluationRecord.model_validate_json(EVALUATION_RECORD.read_text())
    manifest = load_manifest(BUILT_MODELS / "manifest.json")
    for name, entry in manifest.models.items():
        spec = SPECS_BY_NAME[entry.derived_from or name]
        expected = record.serving_sizes.get(spec.name, spec.input_size)
        assert entry.input.width == entry.input.height == expected, name
        assert expected in spec.serving_sizes, name
        if len(spec.serving_sizes) > 1:  # every candidate was tried on val, and the choice follows
            trials = record.serving_size_trials[spec.name]
            assert [t.size for t in trials] == list(spec.serving_sizes)
            assert choose_serving_size(trials) == expected
