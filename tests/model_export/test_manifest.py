"""One manifest schema, shared by the build and the service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.manifest import Manifest, QualityFigures, SourceQuality, load_manifest, manifest_json_schema
from tests.support import write_tiny_models


def test_written_manifest_round_trips(tmp_path: Path) -> None:
    manifest = write_tiny_models(tmp_path, heavy_layers=1)
    assert load_manifest(tmp_path / "manifest.json") == manifest


@pytest.mark.parametrize(
    "mutation",
    [
        lambda m: m.update(schema_version=4),
        lambda m: m["models"]["fast"].update(derived_from="missing"),
        lambda m: m.update(default_model="missing"),
        lambda m: m["models"]["fast"].update(temperature=0),
        lambda m: m["models"]["fast"].update(name="other"),
        lambda m: m["models"]["fast"].update(unexpected_field=1),
        lambda m: m["models"]["fast"]["input"].update(layout="NCHW"),
        lambda m: m["models"]["fast"].update(file="../../etc/passwd"),
        lambda m: m.update(
            cascades=[
                {
                    "small": "fast",
                    "large": "nope",
                    "threshold": 0.9,
                    "escalation_rate_val": 0.1,
                    "accuracy_val": 0.9,
                    "expected_cost_ratio": 0.2,
                }
            ]
        ),
    ],
)
def test_invalid_manifests_are_refused(tmp_path: Path, mutation: object) -> None:
    write_tiny_models(tmp_path, heavy_layers=1)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    mutation(raw)
    with pytest.raises(ValidationError):
        Manifest.model_validate(raw)


def test_json_schema_is_published() -> None:
    schema = manifest_json_schema()
    assert schema["title"] == "Manifest" and "models" in schema["properties"]


def test_an_older_schema_version_asks_for_a_rebuild(tmp_path: Path) -> None:
    write_tiny_models(tmp_path, heavy_layers=1)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["schema_version"] = 2
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="make models"):
        load_manifest(tmp_path / "manifest.json")


def test_hardest_source_is_the_lowest_per_source_accuracy() -> None:
    metrics = QualityFigures(
        split="test",
        n_images=300,
        accuracy=0.99,
        log_loss=0.05,
        ece=0.01,
        ece_uncalibrated=0.02,
        by_source={
            "web": SourceQuality(n_images=100, accuracy=0.995, log_loss=0.02, ece=0.01),
            "kaggle": SourceQuality(n_images=100, accuracy=0.97, log_loss=0.1, ece=0.02),
            "breed": SourceQuality(n_images=100, accuracy=1.0, log_loss=0.01, ece=0.0),
        },
    )
    assert metrics.hardest_source == ("kaggle", 0.97)
    assert metrics.model_copy(update={"by_source": {}}).hardest_source == ("all", 0.99)
