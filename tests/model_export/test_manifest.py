"""One manifest schema, shared by the build and the service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.manifest import Manifest, load_manifest, manifest_json_schema
from tests.conftest import write_tiny_models


def test_written_manifest_round_trips(tmp_path: Path) -> None:
    manifest = write_tiny_models(tmp_path, heavy_layers=1)
    assert load_manifest(tmp_path / "manifest.json") == manifest


@pytest.mark.parametrize("mutation", [
    lambda m: m.update(schema_version=2),
    lambda m: m.update(default_model="missing"),
    lambda m: m["models"]["fast"].update(temperature=0),
    lambda m: m["models"]["fast"].update(name="other"),
    lambda m: m["models"]["fast"].update(unexpected_field=1),
    lambda m: m["models"]["fast"]["input"].update(layout="NCHW"),
    lambda m: m["models"]["fast"].update(file="../../etc/passwd"),
    lambda m: m.update(cascades=[{"small": "fast", "large": "nope", "threshold": 0.9,
                                  "escalation_rate_val": 0.1, "accuracy_val": 0.9, "expected_cost_ratio": 0.2}]),
])
def test_invalid_manifests_are_refused(tmp_path: Path, mutation: object) -> None:
    write_tiny_models(tmp_path, heavy_layers=1)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    mutation(raw)  # type: ignore[operator]
    with pytest.raises(ValidationError):
        Manifest.model_validate(raw)


def test_json_schema_is_published() -> None:
    schema = manifest_json_schema()
    assert schema["title"] == "Manifest" and "models" in schema["properties"]
