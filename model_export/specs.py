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
    input_size: int  # what it is trained at
    # The resolutions it may be served at, the training one first; `build --fit-temperatures`
    # chooses one on validation. Training crops down to a third of a photo's area and scales the
    # crop up, so objects look larger in training than in a whole photo at the same resolution;
    # serving above the training resolution brings them back to the size the model learned
    # (Touvron et al., "Fixing the train-test resolution discrepancy", 2019). Candidates stop at
    # about 1.65x the training resolution's compute: the model's place on the latency frontier.
    serving_candidates: tuple[int, ...] = ()

    @property
    def serving_sizes(self) -> tuple[int, ...]:
        return (self.input_size, *(s for s in self.serving_candidates if s != self.input_size))

    @property
    def weights_file(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.npz"

    @property
    def int8_ranges_file(self) -> Path:
        """Committed int8 activation ranges, so int8 rebuilds without the dataset."""
        return WEIGHTS_DIR / f"{self.name}-int8.ranges.json"


# The MobileNet paper's resolution multiplier gives a second point on the latency/accuracy frontier
# (names keep the training resolution; the manifest's input says what each is served at).
# Xception is served at its training resolution only: it is the slowest model, and its cost is the
# frontier's far end (the cascade's too).
MODEL_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("xception", "xception", 299),
    ModelSpec("mobilenet", "mobilenet_v1", 224, (256, 288)),
    ModelSpec("mobilenet-160", "mobilenet_v1", 160, (192,)),
)
SPECS_BY_NAME = {spec.name: spec for spec in MODEL_SPECS}
CASCADE = ("mobilenet", "xception")  # (small, large)
# The share of the large model's compute the cascade may spend on validation photos (the small model
# included): its threshold escalates the least confident answers up to this, for a margin the
# accuracy rule cannot see (model_export.quality.choose_cascade_threshold). Below the 25 % the
# cascade is meant to cost, as a test set escalates a little more or less than validation.
CASCADE_COMPUTE_BUDGET = 0.20
DEFAULT_MODEL = "xception"


def int8_name(name: str) -> str:
    return f"{name}-int8"
