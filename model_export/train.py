"""Transfer learning in two stages, on cached trunk activations.

Stage 1 (bottleneck): the backbone is frozen; a dense softmax head is fitted on pooled features of
the original and augmented views, with its L2 strength chosen on validation log loss.
Stage 2 (fine-tuning): the top blocks and the head train together on the augmented views with
AdamW and a cosine learning-rate schedule, batch-norm statistics frozen, towards the label or a
blend of the label and a teacher's probabilities on the same view (model_export.teacher). It is
kept only if it improves validation log loss without lowering validation accuracy overall or on
the hardest source; otherwise the stage-1 model stands.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import keras
import numpy as np
from tqdm import tqdm

from catdog_core.probabilities import softmax
from model_export.backbones import Backbone, pooled_features_model, top_model
from model_export.features import Augmentation, Features
from model_export.quality import log_loss
from model_export.teacher import blended_targets, one_hot

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    seed: int = 20261123
    # Augmented views per training photo, by family: Xception's trunk costs about 10x MobileNet's
    # per view on 2 cores, so it gets fewer views to keep `make train` near 90 minutes.
    augmented_views: dict[str, int] = field(default_factory=lambda: {"xception": 1, "mobilenet_v1": 3})
    augmentation: Augmentation = field(default_factory=Augmentation)
    head_l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    head_epochs: int = 60
    finetune: bool = True
    # Fine-tuning runs tried per model, as (peak learning rate, epochs, teacher weight), each from
    # the stage-1 model; validation picks among them (StageResult.improves_on) and training.json
    # records every one. A teacher weight above 0 distils from `train --teacher` (Xception), so
    # Xception itself trains on labels only. It gets one run: each epoch costs about 5 minutes.
    # The MobileNets' label-only runs (1e-4 for 3 epochs, 3e-5 for 4) were dropped after the build
    # of 2026-11-24, whose training.json records them: a distilled run beat both on validation for
    # both models, and replaying the choice without them over that record gave the same one. The
    # distilled 1e-4 run for 5 epochs went after the build of 2026-11-25 (commit c7c80a4): 3e-5 for
    # 4 epochs had the lower validation loss for both models in both builds (mobilenet 0.0248
    # against 0.0262, mobilenet-160 0.0509 against 0.0616, which did not beat stage 1), and its 5
    # epochs were 14.7 of `make train`'s minutes. The record committed since is today's grid's
    # (tests/model_export/test_stage_choice.py checks that its choice follows from the grid).
    finetune_grid: dict[str, tuple[tuple[float, int, float], ...]] = field(
        default_factory=lambda: {
            "xception": ((3e-5, 2, 0.0),),
            "mobilenet": ((3e-5, 4, 0.5),),
            "mobilenet-160": ((3e-5, 4, 0.5),),
        }
    )
    weight_decay: float = 1e-4
    batch_size: int = 32


@dataclass
class StageResult:
    stage: str
    val_accuracy: float
    val_log_loss: float
    val_accuracy_by_source: dict[str, float] = field(default_factory=dict)
    details: dict[str, float] = field(default_factory=dict)

    @property
    def worst_source_accuracy(self) -> float:
        return min(self.val_accuracy_by_source.values(), default=self.val_accuracy)

    def improves_on(self, other: StageResult) -> bool:
        """Lower validation log loss, with accuracy no lower overall nor on the hardest source: the
        figure `auto` and the cascade rule read. (Asking every source to be no lower was tried: one
        photo of 376 decided it, and it refused a stage that helped the hardest source.)"""
        return (
            self.val_log_loss < other.val_log_loss
            and self.val_accuracy >= other.val_accuracy
            and self.worst_source_accuracy >= other.worst_source_accuracy
        )


class _Batches(keras.utils.PyDataset):
    """fp16 activations served as float32 batches, reshuffled each epoch.

    Handing Keras the whole array makes it convert all of it to float32 at once (MobileNet-224's
    23,572 cached views are 4.7 GB in fp16, 9.4 GB in float32, and the copies that follow got the
    process killed on a 24 GiB machine); batches keep memory at one batch.
    """

    def __init__(
        self,
        features: Features,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        targets: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.features, self.batch_size, self.shuffle = features, batch_size, shuffle
        self.targets = features.labels if targets is None else targets
        self.rng = np.random.default_rng(seed)
        self.order = (
            self.rng.permutation(len(features.labels)) if shuffle else np.arange(len(features.labels))
        )

    def __len__(self) -> int:
        return int(np.ceil(len(self.order) / self.batch_size))

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray]:
        rows = np.sort(self.order[index * self.batch_size : (index + 1) * self.batch_size])
        x = self.features.activations[rows].astype(np.float32)
        return (x, self.targets[rows]) if self.shuffle else (x,)

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.order = self.rng.permutation(len(self.order))


class _Bar(keras.callbacks.Callback):
    def __init__(self, total: int, desc: str) -> None:
        super().__init__()
        self.bar = tqdm(total=total, desc=desc, unit="epoch")

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in (logs or {}).items() if "loss" in k})
        self.bar.update()

    def on_train_end(self, logs: dict[str, float] | None = None) -> None:
        self.bar.close()


def _evaluate(
    model: keras.Model, x: np.ndarray, val: Features, stage: str, details: dict[str, float] | None = None
) -> StageResult:
    probs = softmax(model.predict(x, batch_size=128, verbose=0))
    correct = probs.argmax(1) == val.labels
    by_source = {str(s): float(correct[val.sources == s].mean()) for s in np.unique(val.sources)}
    return StageResult(stage, float(correct.mean()), log_loss(probs, val.labels), by_source, details or {})


def _fit_head(
    pooled: np.ndarray,
    y: np.ndarray,
    val: tuple[np.ndarray, np.ndarray],
    l2: float,
    cfg: TrainConfig,
    n_labels: int,
) -> keras.Model:
    inputs = keras.Input((pooled.shape[1],))
    x = keras.layers.Dropout(0.2)(inputs)
    outputs = keras.layers.Dense(n_labels, kernel_regularizer=keras.regularizers.L2(l2), name="logits")(x)
    head = keras.Model(inputs, outputs)
    head.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    stop = keras.callbacks.EarlyStopping(patience=8, restore_best_weights=True)
    head.fit(
        pooled,
        y,
        validation_data=val,
        epochs=cfg.head_epochs,
        batch_size=cfg.batch_size,
        verbose=0,
        callbacks=[stop, _Bar(cfg.head_epochs, f"head l2={l2:g}")],
    )
    return head


def stage1(
    backbone: Backbone, train: Features, val: Features, cfg: TrainConfig, n_labels: int
) -> tuple[keras.Model, StageResult]:
    """Fit the head on pooled frozen features; return the full top model carrying that head."""
    pool = pooled_features_model(backbone)
    pooled_train = pool.predict(_Batches(train, 64, shuffle=False), verbose=1)
    pooled_val = pool.predict(_Batches(val, 64, shuffle=False), verbose=0)
    best: tuple[float, float, keras.Model] | None = None
    for l2 in cfg.head_l2_grid:
        keras.utils.set_random_seed(cfg.seed)
        head = _fit_head(pooled_train, train.labels, (pooled_val, val.labels), l2, cfg, n_labels)
        result = _evaluate(head, pooled_val, val, "head")
        log.info(
            "%s stage 1 l2=%g: val accuracy %.4f %s, log loss %.4f",
            backbone.family,
            l2,
            result.val_accuracy,
            result.val_accuracy_by_source,
            result.val_log_loss,
        )
        if best is None or result.val_log_loss < best[1]:
            best = (l2, result.val_log_loss, head)
    assert best is not None
    model = top_model(backbone, n_labels)
    model.get_layer("logits").set_weights(best[2].get_layer("logits").get_weights())
    return model, _evaluate(model, val.activations, val, "bottleneck", {"l2": best[0]})


def stage2(
    model: keras.Model,
    backbone: Backbone,
    train: Features,
    val: Features,
    cfg: TrainConfig,
    rate: float,
    epochs: int,
    teacher_weight: float = 0.0,
    teacher_name: str | None = None,
) -> StageResult:
    """Fine-tune the top blocks and head in place; restores the best epoch by validation loss.

    The targets blend each view's label with the teacher's probabilities on it (`teacher_weight`);
    validation loss, which early stopping and the choice between runs read, is on labels only.
    """
    n_labels = int(model.output.shape[-1])
    targets = blended_targets(train.labels, n_labels, train.teacher_probs, teacher_weight)
    for layer in backbone.top_layers:
        # Frozen batch norm runs in inference mode, so its statistics stay the pretrained ones.
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    keras.utils.set_random_seed(cfg.seed)
    steps = epochs * int(np.ceil(len(train.labels) / cfg.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(rate, decay_steps=steps)
    model.compile(
        keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay),
        keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    stop = keras.callbacks.EarlyStopping(patience=1, restore_best_weights=True)
    model.fit(
        _Batches(train, cfg.batch_size, shuffle=True, seed=cfg.seed, targets=targets),
        validation_data=(val.activations, one_hot(val.labels, n_labels)),
        epochs=epochs,
        verbose=1,
        callbacks=[stop],
    )
    for layer in backbone.top_layers:
        layer.trainable = False
    return _evaluate(
        model,
        val.activations,
        val,
        f"fine-tuned from {backbone.cut_layer}, lr {rate:g}, {epochs} epochs"
        + (f", distilled from {teacher_name} (weight {teacher_weight:g})" if teacher_weight else ""),
        {
            "epochs": epochs,
            "learning_rate": rate,
            "weight_decay": cfg.weight_decay,
            "teacher_weight": teacher_weight,
        },
    )
