"""`model_export verify`: re-check every built file's hash and numeric parity.

fp32 files are compared with the Keras model rebuilt from the pinned source and committed weights
(max |dp| <= 1e-4); int8 files with their fp32 file (prediction agreement >= 99 %). Parity uses
val-split photos when the dataset is given, synthetic images otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

from catdog_core.hashing import sha256_file
from model_export.data import load_images, stratified_split
from model_export.evaluate import logits_on
from model_export.keras_models import keras_classifier
from model_export.parity import (
    INT8_MIN_AGREEMENT,
    N_PARITY_IMAGES,
    PARITY_TOLERANCE,
    compare,
    synthetic_images,
)
from model_export.records import read_training_record
from model_export.specs import SPECS_BY_NAME, TRAINING_RECORD
from service.manifest import load_manifest

log = logging.getLogger(__name__)


def verify_all(out: Path, cache_dir: Path, data: list[Path] | None = None) -> int:
    manifest = load_manifest(out / "manifest.json")
    failures: list[str] = []
    split = stratified_split(data, read_training_record(TRAINING_RECORD).split.seed) if data else None
    for name, entry in manifest.models.items():
        path = out / entry.file
        actual = sha256_file(path) if path.exists() else "missing"
        if actual != entry.sha256:
            failures.append(f"{name}: sha256 {actual} != manifest {entry.sha256}")
            continue
        base = entry.derived_from or name
        spec = SPECS_BY_NAME[base]
        size = entry.input.width  # the serving resolution, which may be above the training one
        probe = (
            load_images(split.samples["val"][:N_PARITY_IMAGES], size, "parity").arrays
            if split
            else synthetic_images(size, N_PARITY_IMAGES, seed=1)
        )
        if entry.precision == "fp32":
            model, _ = keras_classifier(spec, cache_dir, size)
            parity = compare(
                model.predict(probe, verbose=0), logits_on(path, probe), entry.temperature, "keras"
            )
            ok = parity.max_abs_diff_probability <= PARITY_TOLERANCE
        else:
            parity = compare(
                logits_on(out / manifest.models[base].file, probe),
                logits_on(path, probe),
                entry.temperature,
                "fp32 onnx",
            )
            # Synthetic images sit far from any photo; agreement is only meaningful on real photos.
            ok = parity.prediction_agreement >= INT8_MIN_AGREEMENT or split is None
        log.info(
            "%s: sha256 ok, parity vs %s: max |dp| %.2e, agreement %.4f on %d %s images -> %s",
            name,
            parity.reference,
            parity.max_abs_diff_probability,
            parity.prediction_agreement,
            parity.n_images,
            "val" if split else "synthetic",
            "ok" if ok else "FAILED",
        )
        if not ok:
            failures.append(f"{name}: parity failed ({parity})")
    for failure in failures:
        log.error(failure)
    return 1 if failures else 0
