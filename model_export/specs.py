"""What the build produces: the named models, their backbones and input sizes, and the cascade."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LABELS: tuple[str, ...] = ("cat", "dog")
WEIGHTS_DIR = Path(__file__).parent / "weights"
TRAINING_RECORD = WEIGHTS_DIR / "training.json"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "xception" | "mobilenet_v1"
    input_size: int

    @property
    def weights_file(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.npz"

    @property
    def int8_ranges_file(self) -> Path:
        """Committed int8 activation ranges, so int8 rebuilds without the dataset."""
        return WEIGHTS_DIR / f"{self.name}-int8.ranges.json"


# The MobileNet paper's resolution multiplier gives a second point on the latency/accuracy frontier.
MODEL_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("xception", "xception", 299),
    ModelSpec("mobilenet", "mobilenet_v1", 224),
    ModelSpec("mobilenet-160", "mobilenet_v1", 160),
)
SPECS_BY_NAME = {spec.name: spec for spec in MODEL_SPECS}
CASCADE = ("mobilenet", "xception")  # (small, large)
DEFAULT_MODEL = "xception"


def int8_name(name: str) -> str:
    return f"{name}-int8"
