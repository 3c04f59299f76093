"""Response bodies, as documented in the OpenAPI schema."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable error code.")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class TopEntry(BaseModel):
    label: str
    probability: float


class ImageResult(BaseModel):
    label: str
    model: str = Field(description="The model whose answer this is.")
    confidence: float = Field(description="Calibrated probability of the label.")
    probabilities: dict[str, float] = Field(description="Calibrated probability per label.")
    top: list[TopEntry] | None = Field(None, description="The `top` most probable labels, when asked.")
    confidences: dict[str, float] = Field(
        description="Calibrated top probability of every model that ran on it."
    )
    escalated: bool = Field(False, description="cascade: the small model was unsure, the large one answered.")
    degraded: bool = Field(False, description="cascade: unsure, but the deadline left no time to escalate.")
    cached: bool = Field(
        False, description="Answered from the response cache (same model version, same bytes)."
    )


class TimingsMs(BaseModel):
    decode: float
    queue: float
    inference: float
    total: float


class Selection(BaseModel):
    reason: str = Field(
        description="auto: most_accurate or latency_budget; cascade: confident, escalated, degraded."
    )
    predicted_ms: float | None = Field(None, description="auto: predicted latency of the chosen model.")
    actual_ms: float | None = Field(None, description="auto: measured latency of the chosen model.")
    budget_ms: float | None = Field(None, description="auto: the latency budget applied.")
    min_accuracy: float | None = None
    threshold: float | None = Field(None, description="cascade: escalate below this calibrated confidence.")
    small: str | None = None
    large: str | None = None


class ClassifyResponse(BaseModel):
    request_id: str
    mode: str = Field(description="model, auto or cascade.")
    model: str = Field(description="The model that produced the answer ('cascade' for a cascade).")
    version: str | None = Field(description="Version of that model; null for a cascade.")
    device: str
    models_run: list[str]
    selection: Selection | None = None
    results: list[ImageResult] = Field(description="One per image, in upload order.")
    timings_ms: TimingsMs
    batch_sizes: list[int] = Field(description="Size of the inference batch each image ran in.")


class ModelInfo(BaseModel):
    name: str
    version: str
    family: str
    precision: str
    device: str
    provider: str = Field(
        description="The onnxruntime execution provider that runs it: CPUExecutionProvider, "
        "OpenVINOExecutionProvider (device cpu too) or CUDAExecutionProvider."
    )
    compute_precision: str = Field(
        description="What the provider computes the model's floating-point layers in: bf16 on "
        "OpenVINO with CATDOG_OPENVINO_PRECISION=bf16, else fp32 (int8 models' quantized layers "
        "run in int8 either way)."
    )
    labels: list[str]
    input_width: int = Field(description="Width the image is resized to.")
    input_height: int = Field(description="Height the image is resized to.")
    test_accuracy: float | None = Field(description="Test split, all sources together.")
    test_log_loss: float | None
    test_ece: float | None
    test_accuracy_by_source: dict[str, float] = Field(
        default_factory=dict, description="Test accuracy on each photo source the build saw."
    )
    selection_accuracy: float | None = Field(
        description="What model=auto's min_accuracy is compared with: the lowest per-source test accuracy."
    )
    selection_accuracy_source: str | None = Field(description="The source that figure comes from.")
    derived_from: str | None = Field(None, description="The fp32 model a quantized variant was made from.")
    build_latency_p50_ms_batch1: float = Field(description="Bare onnxruntime, build machine.")
    live_latency_p50_ms: float | None = Field(
        description="Median of recent batch-1 inference times on this server."
    )
    queue_depth: int
    max_batch: int = Field(
        description="Most images this model runs in one batch here: CATDOG_MAX_BATCH_SIZE, or 1 where the "
        "warm-up measured that batching saves too little per image (CATDOG_MIN_BATCHING_GAIN)."
    )


class CascadeInfo(BaseModel):
    small: str
    large: str
    threshold: float = Field(
        description="Escalate when the small model's calibrated confidence is below this."
    )
    compute_budget: float | None = Field(
        None,
        description="The share of the large model's compute the threshold could spend on validation "
        "photos beyond what the accuracy rule asked (escalating the least confident answers).",
    )
    rule_threshold: float | None = Field(
        None,
        description="The threshold the accuracy rule alone asked on validation (the cascade within 0.1 point "
        "of the large model on every source, and at least the large model's smoothed accuracy), before the "
        "compute budget raised it.",
    )
    test_accuracy: float | None
    test_escalation_rate: float | None
    test_cost_ratio: float | None = Field(description="Mean compute per image relative to the large model.")
    test_accuracy_by_source: dict[str, float] = Field(default_factory=dict)
    test_escalation_rate_by_source: dict[str, float] = Field(default_factory=dict)


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]
    cascades: list[CascadeInfo] = Field(description="Calibrated pairs for model=cascade.")


class Health(BaseModel):
    status: str
