"""`model_export train`: dataset -> trained heads (and tuned top blocks) -> committed weights.

Only developers with the dataset run this. Its outputs (model_export/weights/) are committed, so
users and CI rebuild the models without any data.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from catdog_core.hashing import sha256_file
from model_export import backbones
from model_export.data import Split, stratified_split
from model_export.features import trunk_activations
from model_export.keras_models import load_backbone
from model_export.quality import quality
from model_export.records import SplitRecord, StageRun, TrainedModel, TrainingRecord
from model_export.specs import LABELS, MODEL_SPECS, TRAINING_RECORD, ModelSpec
from model_export.teacher import Teacher
from model_export.train import TrainConfig, stage1, stage2
from model_export.weights_io import round_trip_fp16, save_weights

log = logging.getLogger(__name__)


def needs_teacher(spec: ModelSpec, cfg: TrainConfig) -> bool:
    return cfg.finetune and any(weight > 0 for _, _, weight in cfg.finetune_grid[spec.name])


def train_one(
    spec: ModelSpec, split: Split, cfg: TrainConfig, cache_dir: Path, teacher: Teacher | None = None
) -> TrainedModel:
    backbone, artifact = load_backbone(spec, cache_dir)
    teacher = teacher if needs_teacher(spec, cfg) else None
    train = trunk_activations(
        backbone,
        split.samples["train"],
        cfg.augmented_views[spec.family],
        cfg.seed,
        cache_dir,
        f"{spec.name} train",
        aug=cfg.augmentation,
        teacher=teacher,
    )
    val = trunk_activations(backbone, split.samples["val"], 0, cfg.seed, cache_dir, f"{spec.name} val")
    model, first = stage1(backbone, train, val, cfg, len(LABELS))
    results, best = [first], first
    best_weights = bottleneck_weights = backbones.top_weights(model, include_top_block=True)
    for rate, epochs, weight in cfg.finetune_grid[spec.name] if cfg.finetune else ():
        backbones.apply_weights(model, bottleneck_weights)
        tuned = stage2(
            model, backbone, train, val, cfg, rate, epochs, weight, teacher.member.name if teacher else None
        )
        results.append(tuned)
        log.info(
            "%s %s: val accuracy %.4f %s, log loss %.4f",
            spec.name,
            tuned.stage,
            tuned.val_accuracy,
            tuned.val_accuracy_by_source,
            tuned.val_log_loss,
        )
        if tuned.improves_on(best):
            best, best_weights = tuned, backbones.top_weights(model, include_top_block=True)
    chosen_tuned = best is not first
    backbones.apply_weights(model, best_weights)
    # Evaluate and calibrate what will actually be committed: the fp16-rounded weights.
    committed = round_trip_fp16(backbones.top_weights(model, include_top_block=chosen_tuned))
    backbones.apply_weights(model, committed)
    save_weights(spec.weights_file, committed)
    # Temperature, int8 ranges and the cascade threshold are fitted later, together, by
    # `build --fit-temperatures` on the exported ONNX model's validation logits.
    logits = model.predict(val.activations, batch_size=128, verbose=0)
    raw = quality(logits, val.labels, 1.0)
    log.info("%s: chose %s, val %s", spec.name, best.stage, raw)
    return TrainedModel(
        family=spec.family,
        input_size=spec.input_size,
        fine_tuned_from=backbone.cut_layer,
        augmented_views=cfg.augmented_views[spec.family],
        teacher=f"{teacher.member.name} sha256:{teacher.sha256}" if teacher else None,
        source=artifact.key,
        source_digest=artifact.digest or "",
        stages=[StageRun(**r.__dict__) for r in results],
        chosen_stage=best.stage,
        fine_tuned=chosen_tuned,
        temperature=None,
        val_accuracy=raw.accuracy,
        val_log_loss=raw.log_loss,
        weights_file=spec.weights_file.name,
        weights_sha256=sha256_file(spec.weights_file),
        weights_bytes=spec.weights_file.stat().st_size,
    )


def train_all(
    data: Sequence[Path],
    cfg: TrainConfig,
    cache_dir: Path,
    names: list[str] | None = None,
    previous: TrainingRecord | None = None,
    teacher: Teacher | None = None,
) -> TrainingRecord:
    chosen = [spec for spec in MODEL_SPECS if not names or spec.name in names]
    if missing := [spec.name for spec in chosen if needs_teacher(spec, cfg) and teacher is None]:
        # Fail before hours of feature extraction, not after.
        raise ValueError(
            f"{', '.join(missing)} distil from a teacher: pass --teacher (make train passes "
            "build/teacher/xception-int8.onnx, built from the Xception it trains first)"
        )
    split = stratified_split(data, cfg.seed)
    log.info("split %s: %s", split.sha256[:12], split.source_counts())
    models = dict(previous.models) if previous else {}
    for spec in chosen:
        models[spec.name] = train_one(spec, split, cfg, cache_dir, teacher)
    record = TrainingRecord(
        labels=list(LABELS),
        split=SplitRecord(
            seed=split.seed,
            fractions=split.fractions,
            sha256=split.sha256,
            roots=[root.name for root in data],
            counts=split.counts(),
            source_counts=split.source_counts(),
        ),
        train_config=dataclasses.asdict(cfg),
        models=models,
    )
    record.write(TRAINING_RECORD)
    return record
