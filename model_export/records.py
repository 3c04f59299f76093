"""The build's two records beside the committed weights, typed like the manifest.

`training.json` is written by `train` only: the split, the recipe and every run it tried, and the
weights it committed. `evaluation.json` is written by `build --fit-temperatures/--int8-ranges`
with the dataset: the serving resolutions and temperatures chosen on validation, the int8 keep
decisions and the figures measured on exactly those weights, so `make models` can carry them
without the dataset.

Schema 1 for both: the first typed version (the files before it had the same fields, untyped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.manifest import CascadeEntry, QualityFigures


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")


class SplitRecord(_Record):
    seed: int
    fractions: tuple[float, float, float]
    sha256: str
    roots: list[str] = Field(default_factory=list)
    counts: dict[str, dict[str, int]] = Field(description="split -> label -> images")
    source_counts: dict[str, dict[str, int]] = Field(description="split -> source -> images")


class StageRun(_Record):
    """One run of the recipe, scored on validation."""

    stage: str
    details: dict[str, float | int]
    val_accuracy: float
    val_accuracy_by_source: dict[str, float]
    val_log_loss: float


class TrainedModel(_Record):
    family: str
    input_size: int
    fine_tuned_from: str | None
    augmented_views: int
    teacher: str | None = Field(default=None, description="The model distilled from, if any.")
    source: str
    source_digest: str
    stages: list[StageRun]
    chosen_stage: str | None = None
    fine_tuned: bool
    temperature: float | None = Field(description="Fitted on Keras val logits by train, if at all.")
    val_accuracy: float
    val_log_loss: float
    weights_file: str
    weights_sha256: str
    weights_bytes: int


class TrainingRecord(_Record):
    schema_version: Literal[1] = 1
    labels: list[str]
    split: SplitRecord
    train_config: dict[str, Any] = Field(description="model_export.train.TrainConfig, as trained.")
    models: dict[str, TrainedModel]

    def weights_sha256(self) -> dict[str, str]:
        return {name: model.weights_sha256 for name, model in self.models.items()}


class ModelFigures(_Record):
    val: QualityFigures | None
    test: QualityFigures | None


class ServingSizeTrial(_Record):
    """One resolution a model was tried at on validation, with the temperature fitted there."""

    size: int
    temperature: float
    val_accuracy: float
    val_worst_source_accuracy: float
    val_log_loss: float  # calibrated (at that temperature)


class EvaluationRecord(_Record):
    schema_version: Literal[1] = 1
    weights_sha256: dict[str, str] = Field(description="The committed weights these figures belong to.")
    split_sha256: str
    temperatures: dict[str, float] = Field(default_factory=dict)
    serving_sizes: dict[str, int] = Field(
        default_factory=dict, description="The resolution each model is served at, chosen on val."
    )
    serving_size_trials: dict[str, list[ServingSizeTrial]] = Field(default_factory=dict)
    int8_kept: dict[str, bool]
    models: dict[str, ModelFigures]
    cascades: list[CascadeEntry]


def read_training_record(path: Path) -> TrainingRecord:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the trained weights are committed with the source; "
            "run `python -m model_export train --data DIR` to create them"
        )
    return TrainingRecord.model_validate_json(path.read_text())


def read_evaluation_record(path: Path) -> EvaluationRecord | None:
    return EvaluationRecord.model_validate_json(path.read_text()) if path.exists() else None
