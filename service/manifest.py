"""The model manifest: one schema, written by model_export and read by the service.

Everything the service needs to run a model correctly (input size, layout, dtype, labels,
temperature) travels here with the model, so the service never hard-codes a size or a mean.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# 2: per-source figures (QualityFigures.by_source, CascadeEntry.test_by_source), the dataset's sources
#    (Manifest.dataset) and ModelEntry.derived_from. A version-1 manifest is refused with a message
#    to rebuild (`make models`): the build is reproducible, so migrating in place buys nothing.
# 3: Latency.session_profile: the onnxruntime options the latency was measured with, the server's
#    own (catdog_core.sessions); v2 figures were taken with memory patterns on, unlike the server.
#    Older manifests are refused the same way: `make models` writes a v3 one from the same weights.
SCHEMA_VERSION: Literal[3] = 3


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """How an image becomes the model's input tensor."""

    name: str = Field(description="ONNX input name.")
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    layout: Literal["NHWC"] = "NHWC"
    dtype: Literal["uint8"] = Field(
        "uint8", description="RGB pixel values 0..255; scaling to the backbone's range is in-graph."
    )
    resize: Literal["squash"] = Field(
        "squash", description="Whole image resized to height x width, aspect ratio not kept."
    )
    resample: Literal["bilinear"] = "bilinear"
    in_graph_normalisation: str = Field(description="What the graph does to the uint8 input.")


class OutputSpec(_Strict):
    name: str = Field(description="ONNX output name; raw logits, one per label.")
    kind: Literal["logits"] = "logits"


class _Quality(_Strict):
    """The figures measured on any set of photos: a split, or one source's photos within it."""

    n_images: int = Field(ge=0)
    accuracy: float = Field(ge=0, le=1)
    log_loss: float = Field(ge=0)
    ece: float = Field(ge=0, le=1, description="Expected calibration error after temperature scaling.")
    ece_if_calibrated_median: float | None = Field(
        None,
        ge=0,
        le=1,
        description="The ECE a perfectly calibrated model with the same confidences would measure on "
        "these photos, median over simulated label sets: the noise floor of `ece` at this many photos.",
    )
    ece_if_calibrated_p95: float | None = Field(
        None,
        ge=0,
        le=1,
        description="The 95th percentile of that: an `ece` above it is miscalibration these photos can "
        "show, one below it is not evidence of any.",
    )


class SourceQuality(_Quality):
    """Classification quality on the photos of one source within a split."""


class QualityFigures(_Quality):
    """Classification quality measured on one split with onnxruntime, overall and per source."""

    split: Literal["val", "test"]
    ece_uncalibrated: float = Field(ge=0, le=1)
    by_source: dict[str, SourceQuality] = Field(
        default_factory=dict, description="The same figures on each source's photos in this split."
    )

    @property
    def hardest_source(self) -> tuple[str, float]:
        """(source, accuracy) of the source with the lowest accuracy; the overall figure if none.

        What `auto`'s min_accuracy and the cascade rule compare against: a caller asking for 99 %
        should get it on the hardest kind of photo the build saw, not on the average one.
        """
        if not self.by_source:
            return "all", self.accuracy
        source = min(self.by_source, key=lambda name: self.by_source[name].accuracy)
        return source, self.by_source[source].accuracy


class Latency(_Strict):
    """Bare onnxruntime latency on the build machine (p50 over repeated runs)."""

    p50_ms_batch1: float = Field(gt=0)
    p50_ms_batch8: float = Field(gt=0, description="Per call of 8 images, not per image.")
    intra_op_threads: int = Field(gt=0)
    machine: str
    session_profile: str = Field(
        description="The onnxruntime session options the figures were measured with."
    )


class Parity(_Strict):
    """Numeric checks of the exported file against its reference."""

    reference: str = Field(description="What the file was compared with (framework or fp32 ONNX).")
    n_images: int = Field(ge=0)
    max_abs_diff_probability: float = Field(ge=0)
    prediction_agreement: float = Field(ge=0, le=1)


class Provenance(_Strict):
    source_artifact: str = Field(description="Pinned artifact the pretrained backbone came from.")
    source_sha256: str
    trained_weights_sha256: str = Field(description="sha256 of the committed trained weights file.")
    dataset_split_sha256: str = Field(description="Hash of the file list and split assignment.")
    git_commit: str
    exporter: str = Field(description="Exporter and library versions used to write the file.")


class ModelEntry(_Strict):
    name: str
    version: str = Field(description="Content-derived version: first 12 hex digits of the file sha256.")
    family: str = Field(description="Backbone family, e.g. xception or mobilenet_v1.")
    precision: Literal["fp32", "int8"]
    derived_from: str | None = Field(
        None, description="For a quantized variant: the name of the fp32 model it was made from."
    )
    file: str = Field(description="File name relative to the manifest's folder.")
    sha256: str
    labels: list[str] = Field(min_length=2)
    temperature: float = Field(gt=0, description="Logits are divided by this before softmax.")
    input: InputSpec
    output: OutputSpec
    test: QualityFigures | None = Field(
        description="Test-split metrics; None when built without the dataset."
    )
    val: QualityFigures | None = None
    latency: Latency
    parameters: int = Field(gt=0)
    flops: int = Field(gt=0, description="Multiply-adds x 2 for one image.")
    parity: Parity
    provenance: Provenance

    @field_validator("file")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        # The service opens this path: a manifest must not point outside its own folder.
        if value != Path(value).name or value in ("", ".", ".."):
            raise ValueError(f"file must be a plain file name, got {value!r}")
        return value


class CascadeSourceFigures(_Strict):
    """A cascade's test figures on one source."""

    n_images: int = Field(ge=0)
    accuracy: float = Field(ge=0, le=1)
    large_accuracy: float = Field(ge=0, le=1, description="The large model alone on the same photos.")
    escalation_rate: float = Field(ge=0, le=1)
    cost_ratio: float = Field(ge=0, description="Mean compute per image relative to the large model's.")


class CascadeEntry(_Strict):
    """A small model backed by a large one when the small one is unsure."""

    small: str
    large: str
    threshold: float = Field(ge=0, le=1, description="Escalate when calibrated top probability < this.")
    chosen_on: Literal["val"] = "val"
    escalation_rate_val: float = Field(ge=0, le=1)
    accuracy_val: float = Field(ge=0, le=1)
    expected_cost_ratio: float = Field(
        ge=0, description="Mean compute per image relative to always running the large model."
    )
    compute_budget: float | None = Field(
        None,
        ge=0,
        description="The share of the large model's compute the threshold was allowed to spend on val "
        "(None: the accuracy rule's threshold alone).",
    )
    rule_threshold: float | None = Field(
        None, ge=0, le=1, description="What the accuracy rule alone asked, before the compute budget."
    )
    test: QualityFigures | None = Field(None, description="The cascade's own quality on the test split.")
    test_escalation_rate: float | None = Field(None, ge=0, le=1)
    test_cost_ratio: float | None = Field(
        None, ge=0, description="Measured mean compute on test / large model's."
    )
    test_by_source: dict[str, CascadeSourceFigures] = Field(default_factory=dict)


class DatasetInfo(_Strict):
    """The photos the figures were measured on: the split's identity and its sources."""

    split_sha256: str
    seed: int
    roots: list[str] = Field(description="Folder names of the data roots (each one or more sources).")
    images_by_source: dict[str, dict[str, int]] = Field(
        description="{split: {source: photos}} for train, val and test."
    )


class Manifest(_Strict):
    schema_version: Literal[3] = SCHEMA_VERSION
    created: str
    models: dict[str, ModelEntry]
    cascades: list[CascadeEntry] = []
    default_model: str
    dataset: DatasetInfo | None = Field(None, description="None when no build measured on the dataset.")

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        for key, entry in self.models.items():
            if key != entry.name:
                raise ValueError(f"model key {key!r} differs from its name {entry.name!r}")
        if self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not among the models")
        for entry in self.models.values():
            if entry.derived_from is not None and entry.derived_from not in self.models:
                raise ValueError(f"{entry.name} is derived from {entry.derived_from!r}, not among the models")
        for cascade in self.cascades:
            for member in (cascade.small, cascade.large):
                if member not in self.models:
                    raise ValueError(f"cascade member {member!r} is not among the models")
        return self

    def path_of(self, name: str, manifest_path: Path) -> Path:
        return manifest_path.parent / self.models[name].file


def load_manifest(path: Path) -> Manifest:
    """Read and validate a manifest; raises ValueError with the reason if it is not valid."""
    text = path.read_text()
    version = json.loads(text).get("schema_version") if text.lstrip().startswith("{") else None
    if isinstance(version, int) and version < SCHEMA_VERSION:
        raise ValueError(
            f"{path} has manifest schema version {version}; this service reads version "
            f"{SCHEMA_VERSION}: rebuild the models (`make models`)"
        )
    return Manifest.model_validate_json(text)


def write_manifest(manifest: Manifest, path: Path) -> None:
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")


def manifest_json_schema() -> dict[str, object]:
    return Manifest.model_json_schema()
