"""Transfer learning in two stages, on cached trunk activations.

Stage 1 (bottleneck): the backbone is frozen; a dense softmax head is fitted on pooled features of
the original and augmented views, with its L2 strength chosen on validation log loss.
Stage 2 (fine-tuning): the top block and the head train together at a low learning rate on the
augmented views, batch-norm statistics frozen. It is kept only if it improves validation log loss
without lowering validation accuracy; otherwise the stage-1 model stands.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import keras
import numpy as np
from tqdm import tqdm

from model_export.backbones import Backbone, pooled_features_model, top_model
from model_export.calibration import log_loss, softmax

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    seed: int = 20261123
    n_augmented: int = 2
    head_l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    head_epochs: int = 60
    finetune: bool = True
    finetune_epochs: int = 4
    finetune_learning_rate: float = 2e-5
    batch_size: int = 32


@dataclass
class StageResult:
    stage: str
    val_accuracy: float
    val_log_loss: float
    details: dict[str, float] = field(default_factory=dict)


class _Bar(keras.callbacks.Callback):
    def __init__(self, total: int, desc: str) -> None:
        super().__init__()
        self.bar = tqdm(total=total, desc=desc, unit="epoch")

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in (logs or {}).items() if "loss" in k})
        self.bar.update()

    def on_train_end(self, logs: dict[str, float] | None = None) -> None:
        self.bar.close()


def _evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    probs = softmax(model.predict(x, batch_size=128, verbose=0))
    return float((probs.argmax(1) == y).mean()), log_loss(probs, y)


def _fit_head(pooled: np.ndarray, y: np.ndarray, val: tuple[np.ndarray, np.ndarray], l2: float,
              cfg: TrainConfig, n_labels: int) -> keras.Model:
    inputs = keras.Input((pooled.shape[1],))
    x = keras.layers.Dropout(0.2)(inputs)
    outputs = keras.layers.Dense(n_labels, kernel_regularizer=keras.regularizers.L2(l2), name="logits")(x)
    head = keras.Model(inputs, outputs)
    head.compile(keras.optimizers.Adam(1e-3),
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    stop = keras.callbacks.EarlyStopping(patience=8, restore_best_weights=True)
    head.fit(pooled, y, validation_data=val, epochs=cfg.head_epochs, batch_size=cfg.batch_size,
             verbose=0, callbacks=[stop, _Bar(cfg.head_epochs, f"head l2={l2:g}")])
    return head


def stage1(backbone: Backbone, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
           cfg: TrainConfig, n_labels: int) -> tuple[keras.Model, StageResult]:
    """Fit the head on pooled frozen features; return the full top model carrying that head."""
    pool = pooled_features_model(backbone)
    pooled_train = pool.predict(train[0], batch_size=64, verbose=1)
    pooled_val = pool.predict(val[0], batch_size=64, verbose=0)
    best: tuple[float, float, keras.Model] | None = None
    for l2 in cfg.head_l2_grid:
        keras.utils.set_random_seed(cfg.seed)
        head = _fit_head(pooled_train, train[1], (pooled_val, val[1]), l2, cfg, n_labels)
        accuracy, loss = _evaluate(head, pooled_val, val[1])
        log.info("%s stage 1 l2=%g: val accuracy %.4f, log loss %.4f", backbone.family, l2, accuracy, loss)
        if best is None or loss < best[1]:
            best = (l2, loss, head)
    assert best is not None
    model = top_model(backbone, n_labels)
    model.get_layer("logits").set_weights(best[2].get_layer("logits").get_weights())
    accuracy, loss = _evaluate(model, val[0], val[1])
    return model, StageResult("bottleneck", accuracy, loss, {"l2": best[0]})


def stage2(model: keras.Model, backbone: Backbone, train: tuple[np.ndarray, np.ndarray],
           val: tuple[np.ndarray, np.ndarray], cfg: TrainConfig) -> StageResult:
    """Fine-tune the top block and head in place; restores the best epoch by validation loss."""
    for layer in backbone.top_layers:
        # Frozen batch norm runs in inference mode, so its statistics stay the pretrained ones.
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    keras.utils.set_random_seed(cfg.seed)
    model.compile(keras.optimizers.Adam(cfg.finetune_learning_rate),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    stop = keras.callbacks.EarlyStopping(patience=1, restore_best_weights=True)
    model.fit(train[0], train[1], validation_data=val, epochs=cfg.finetune_epochs, shuffle=True,
              batch_size=cfg.batch_size, verbose=1, callbacks=[stop])
    for layer in backbone.top_layers:
        layer.trainable = False
    accuracy, loss = _evaluate(model, val[0], val[1])
    return StageResult("fine-tuned top block", accuracy, loss)
