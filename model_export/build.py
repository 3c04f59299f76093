"""`model_export build`: pinned sources + committed weights -> verified ONNX files + manifest.

Runs without the dataset (users, containers). Given the dataset it also measures accuracy,
calibration error and the cascade on the documented split; without it, those figures come from the
evaluation recorded by the last build that had the dataset, and only if it was made from the very
same committed weights.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catdog_core.hashing import sha256_file
from catdog_core.machine import machine_description
from catdog_core.sessions import SESSION_PROFILE, cpu_session, latency_p50_ms, run_batches
from model_export import backbones, onnx_tools, sources
from model_export.data import Sample, Split, load_images, stratified_split
from model_export.evaluate import Evaluation, Member, measure_cascade
from model_export.keras_models import keras_classifier
from model_export.parity import (
    INT8_MIN_AGREEMENT,
    N_PARITY_IMAGES,
    PARITY_TOLERANCE,
    ParityError,
    compare,
    synthetic_images,
)
from model_export.quality import fit_temperature
from model_export.quantize import quantize
from model_export.records import (
    EvaluationRecord,
    ModelFigures,
    ServingSizeTrial,
    TrainingRecord,
    read_evaluation_record,
    read_training_record,
)
from model_export.specs import (
    CASCADE,
    DEFAULT_MODEL,
    LABELS,
    MODEL_SPECS,
    TRAINING_RECORD,
    WEIGHTS_DIR,
    ModelSpec,
    int8_name,
)
from service.manifest import (
    CascadeEntry,
    DatasetInfo,
    InputSpec,
    Latency,
    Manifest,
    ModelEntry,
    OutputSpec,
    Parity,
    Provenance,
    QualityFigures,
    write_manifest,
)

log = logging.getLogger(__name__)

EVALUATION_RECORD = WEIGHTS_DIR / "evaluation.json"
INT8_MAX_ACCURACY_DROP = 0.003
N_INT8_RANGE_IMAGES = 64


@dataclass
class Built:
    spec: ModelSpec
    name: str
    precision: str
    path: Path
    parity: Parity
    exporter: str
    parameters: int
    temperature: float
    size: int  # the serving resolution (the spec's training one unless validation chose another)

    @property
    def member(self) -> Member:
        return Member(self.name, self.path, self.size, self.temperature)


def git_commit() -> str:
    if os.environ.get("CATDOG_GIT_COMMIT"):  # container builds have no .git
        return os.environ["CATDOG_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def export_fp32(
    spec: ModelSpec,
    out: Path,
    cache_dir: Path,
    probe: np.ndarray,
    temperature: float,
    name: str | None = None,
) -> Built:
    """Export at the probe's resolution, check, and compare with Keras (parity on raw
    probabilities, T = 1). `name`: the file's and member's name (default: the spec's)."""
    size = probe.shape[1]
    model, _ = keras_classifier(spec, cache_dir, size)
    name = name or spec.name
    path = out / f"{name}.onnx"
    exporter = onnx_tools.export_keras(model, path)
    log.info("%s: exported, ops %s", spec.name, onnx_tools.check(path))
    expected = model.predict(probe, batch_size=8, verbose=0)
    actual = run_batches(cpu_session(path, 2), probe)
    parity = compare(expected, actual, 1.0, "keras (tensorflow backend)")
    if parity.max_abs_diff_probability > PARITY_TOLERANCE:
        raise ParityError(f"{spec.name}: ONNX vs keras max |dp| {parity.max_abs_diff_probability:.2e}")
    return Built(spec, name, "fp32", path, parity, exporter, int(model.count_params()), temperature, size)


def export_int8(fp32: Built, range_images: np.ndarray | None, probe: np.ndarray, temperature: float) -> Built:
    path = fp32.path.with_name(f"{int8_name(fp32.name)}.onnx")
    input_name, _ = onnx_tools.io_names(fp32.path)
    quantize(fp32.path, path, fp32.spec.int8_ranges_file, input_name, range_images)
    if range_images is not None:
        _slim_int8_ranges(fp32.spec.int8_ranges_file)
    onnx_tools.check(path)
    reference = run_batches(cpu_session(fp32.path, 2), probe)
    actual = run_batches(cpu_session(path, 2), probe)
    parity = compare(reference, actual, 1.0, f"{fp32.name} fp32 onnx")
    exporter = (
        f"{fp32.exporter}; onnxruntime.quantization static QDQ per-channel, percentile, "
        "7-bit weights (depthwise 8-bit), biases corrected for the weights' rounding"
    )
    return Built(
        fp32.spec,
        int8_name(fp32.name),
        "int8",
        path,
        parity,
        exporter,
        fp32.parameters,
        temperature,
        fp32.size,
    )


def _slim_int8_ranges(path: Path) -> None:
    """Keep only each tensor's range: the histograms are large and quantization never reads them."""
    payload = json.loads(path.read_text())
    for entry in payload.get("data", {}).values():
        if isinstance(entry, dict):
            for key in ("hist", "bins", "hist_edges"):
                entry.pop(key, None)
    path.write_text(json.dumps(payload, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Int8Decision:
    kept: bool
    reason: str
    worst_accuracy_drop: float  # fp32 minus int8 validation accuracy, on the worst source
    agreement: float
    speedup_batch1: float


def int8_decision(
    fp_logits: np.ndarray,
    q_logits: np.ndarray,
    labels: np.ndarray,
    sources: np.ndarray,
    fp_ms: float,
    q_ms: float,
) -> Int8Decision:
    """Keep an int8 variant only if it is at most INT8_MAX_ACCURACY_DROP below its fp32 model on
    validation overall and on every source, agrees with it on INT8_MIN_AGREEMENT of the photos, and
    is faster at batch 1 (bare onnxruntime, the same run)."""
    fp_right, q_right = fp_logits.argmax(1) == labels, q_logits.argmax(1) == labels
    groups = [np.ones(len(labels), bool)] + [sources == s for s in np.unique(sources)]
    drop = max(float(fp_right[g].mean() - q_right[g].mean()) for g in groups)
    agreement = float((fp_logits.argmax(1) == q_logits.argmax(1)).mean())
    speedup = fp_ms / q_ms
    refusals = [
        (drop > INT8_MAX_ACCURACY_DROP, f"loses {100 * drop:.2f} points of val accuracy on a source"),
        (agreement < INT8_MIN_AGREEMENT, f"agrees with fp32 on only {100 * agreement:.2f} % of val photos"),
        (speedup <= 1.0, f"not faster than fp32 ({speedup:.2f}x)"),
    ]
    refused = next((reason for failed, reason in refusals if failed), None)
    reason = refused or f"kept: {speedup:.2f}x faster, worst val drop {100 * drop:.2f} points"
    return Int8Decision(refused is None, reason, drop, agreement, speedup)


def int8_is_kept(
    fp32: Built,
    int8: Built,
    fp_entry: ModelEntry,
    q_entry: ModelEntry,
    evaluation: Evaluation | None,
    previous: EvaluationRecord | None,
) -> bool:
    """Measured on val when the dataset is here; otherwise the recorded decision for these weights."""
    if evaluation is None:
        return previous is not None and previous.int8_kept.get(int8.name, False)
    fp_logits, labels = evaluation.logits(fp32.member, "val")
    q_logits, _ = evaluation.logits(int8.member, "val")
    decision = int8_decision(
        fp_logits,
        q_logits,
        labels,
        evaluation.sources("val"),
        fp_entry.latency.p50_ms_batch1,
        q_entry.latency.p50_ms_batch1,
    )
    log.info("%s: %s (agreement %.4f)", int8.name, decision.reason, decision.agreement)
    return decision.kept


def int8_range_samples(train: list[Sample], n: int = N_INT8_RANGE_IMAGES) -> list[Sample]:
    """n photos spread evenly over the train split, which is ordered by class and source: every
    stratum contributes, so the activation ranges cover every kind of photo."""
    step = max(1, len(train) // n)
    return train[::step][:n]


def _dataset_info(split: Split | None, roots: list[Path] | None, record: TrainingRecord) -> DatasetInfo:
    if split is None:  # the figures are the recorded ones: so is the split they were measured on
        saved = record.split
        return DatasetInfo(
            split_sha256=saved.sha256,
            seed=saved.seed,
            roots=saved.roots,
            images_by_source=saved.source_counts,
        )
    return DatasetInfo(
        split_sha256=split.sha256,
        seed=split.seed,
        roots=[r.name for r in roots or []],
        images_by_source=split.source_counts(),
    )


def build_all(
    out: Path,
    data: list[Path] | None,
    cache_dir: Path,
    threads: int,
    fit_temperatures: bool = False,
    int8_ranges: bool = False,
    only: Sequence[str] | None = None,
) -> Manifest:
    """fit_temperatures: fit each model's temperature on val (recorded in evaluation.json, never in
    the training record); int8_ranges: recompute the int8 activation ranges and the convolutions'
    input means from train photos (written to weights/*-int8.ranges.json and
    *-int8.input-means.json). Both need the dataset.

    only: build just these models (with their int8 variants) and no cascade, for a teacher that
    `make train` needs before the rest is trained; such a partial build records no evaluation."""
    specs = _chosen_specs(only)
    partial = len(specs) < len(MODEL_SPECS)
    record = read_training_record(TRAINING_RECORD)
    out.mkdir(parents=True, exist_ok=True)
    split = stratified_split(data, record.split.seed, record.split.fractions) if data else None
    if split is not None and split.sha256 != record.split.sha256:
        log.warning(
            "dataset split %s differs from the one trained on (%s): figures are not comparable",
            split.sha256[:12],
            record.split.sha256[:12],
        )
    if (fit_temperatures or int8_ranges) and split is None:
        raise ValueError("--fit-temperatures and --int8-ranges need --data")
    evaluation = Evaluation(split.samples) if split is not None else None
    previous = _previous_evaluation(record)
    entries: dict[str, ModelEntry] = {}
    int8_kept: dict[str, bool] = {}
    temperatures: dict[str, float] = {}
    size_trials: dict[str, list[ServingSizeTrial]] = {}
    built_models: dict[str, Built] = {}
    for spec in specs:
        trained = record.models[spec.name]
        size = _recorded_serving_size(spec, previous)
        if fit_temperatures and evaluation is not None and len(spec.serving_sizes) > 1:
            size_trials[spec.name] = try_serving_sizes(spec, out, cache_dir, evaluation)
            size = choose_serving_size(size_trials[spec.name])
            log.info("%s: served at %d px, chosen on val", spec.name, size)
        probe = (
            evaluation.images("val", size)[0][:N_PARITY_IMAGES]
            if evaluation
            else synthetic_images(size, N_PARITY_IMAGES)
        )
        # The temperature fitted on the exported model (recorded with the evaluation) wins over the
        # one training fitted on Keras logits.
        known = (previous.temperatures.get(spec.name) if previous else None) or trained.temperature
        fp32 = export_fp32(spec, out, cache_dir, probe, known or 1.0)
        if fit_temperatures and evaluation is not None:
            fp32.temperature = fit_temperature(*evaluation.logits(fp32.member, "val"))
            log.info("%s: temperature %.4f fitted on val", spec.name, fp32.temperature)
        elif known is None:
            raise ValueError(
                f"{spec.name} has no fitted temperature: run `build --fit-temperatures --data DIR`"
            )
        temperatures[spec.name] = fp32.temperature
        range_images = None
        if int8_ranges and evaluation is not None:
            range_images = load_images(
                int8_range_samples(evaluation.sets["train"]), size, "int8 range images"
            ).arrays
        int8 = export_int8(fp32, range_images, probe, fp32.temperature)
        # A partial build feeds training, not users: its test figures would go unread (2 minutes).
        fp_entry = _entry(fp32, record, evaluation, previous, threads, with_test=not partial)
        q_entry = _entry(int8, record, evaluation, previous, threads, with_test=not partial)
        int8_kept[int8.name] = int8_is_kept(fp32, int8, fp_entry, q_entry, evaluation, previous)
        built_models[fp32.name], entries[fp32.name] = fp32, fp_entry
        if int8_kept[int8.name]:
            built_models[int8.name], entries[int8.name] = int8, q_entry
        else:
            int8.path.unlink()
    cascades = [] if partial else [_cascade(entries, built_models, evaluation, previous)]
    manifest = Manifest(
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        models=entries,
        cascades=cascades,
        default_model=DEFAULT_MODEL,
        dataset=_dataset_info(split, data, record),
    )
    write_manifest(manifest, out / "manifest.json")
    if evaluation is not None and (fit_temperatures or int8_ranges) and not partial:
        sizes = {name: built.size for name, built in built_models.items() if built.precision == "fp32"}
        _record_evaluation(manifest, int8_kept, temperatures, sizes, size_trials, record)
    log.info("wrote %s with %d models", out / "manifest.json", len(entries))
    return manifest


def _recorded_serving_size(spec: ModelSpec, previous: EvaluationRecord | None) -> int:
    """The resolution chosen with these weights, or the training one: when nothing was recorded, or
    the recorded size is no longer a candidate (the spec changed since; refit to choose again)."""
    recorded = previous.serving_sizes.get(spec.name) if previous else None
    if recorded is not None and recorded not in spec.serving_sizes:
        log.warning(
            "%s: recorded serving size %d is not a candidate any more; serving %d",
            spec.name,
            recorded,
            spec.input_size,
        )
        recorded = None
    return recorded or spec.input_size


def try_serving_sizes(
    spec: ModelSpec, out: Path, cache_dir: Path, evaluation: Evaluation
) -> list[ServingSizeTrial]:
    """The model exported at each of its candidate resolutions and measured on val, a temperature
    fitted at each (the files are temporary: the chosen size is exported again)."""
    trials = []
    with tempfile.TemporaryDirectory(dir=out, prefix=".serving-sizes-") as tmp:
        for size in spec.serving_sizes:
            probe = evaluation.images("val", size)[0][:N_PARITY_IMAGES]
            built = export_fp32(spec, Path(tmp), cache_dir, probe, 1.0, name=f"{spec.name}@{size}")
            built.temperature = fit_temperature(*evaluation.logits(built.member, "val"))
            figures = evaluation.metrics(built.member, "val", "val")  # logits cached, at the new T
            trial = ServingSizeTrial(
                size=size,
                temperature=built.temperature,
                val_accuracy=figures.accuracy,
                val_worst_source_accuracy=min(s.accuracy for s in figures.by_source.values()),
                val_log_loss=figures.log_loss,
            )
            trials.append(trial)
            log.info("%s at %d px: %s", spec.name, size, trials[-1])
    return trials


def choose_serving_size(trials: list[ServingSizeTrial]) -> int:
    """The resolution with the lowest calibrated val log loss among those that lose no val accuracy,
    overall or on the hardest source, against the first (the training resolution)."""
    base = trials[0]
    allowed = [
        t
        for t in trials
        if t.val_accuracy >= base.val_accuracy
        and t.val_worst_source_accuracy >= base.val_worst_source_accuracy
    ]
    return min(allowed, key=lambda t: t.val_log_loss).size


def _chosen_specs(only: Sequence[str] | None) -> list[ModelSpec]:
    if not only:
        return list(MODEL_SPECS)
    known = {spec.name for spec in MODEL_SPECS}
    if unknown := sorted(set(only) - known):
        raise ValueError(f"--only {', '.join(unknown)}: not a model (known: {', '.join(sorted(known))})")
    if DEFAULT_MODEL not in only:
        # A manifest names its default model; a partial build without it could not be served.
        raise ValueError(f"--only must include the default model {DEFAULT_MODEL!r}")
    return [spec for spec in MODEL_SPECS if spec.name in only]


def _previous_evaluation(record: TrainingRecord) -> EvaluationRecord | None:
    """The recorded evaluation, if it was measured on exactly the committed weights."""
    saved = read_evaluation_record(EVALUATION_RECORD)
    if saved is not None and saved.weights_sha256 != record.weights_sha256():
        log.warning("recorded evaluation is for other weights; manifest will carry no accuracy figures")
        return None
    return saved


def _record_evaluation(
    manifest: Manifest,
    int8_kept: dict[str, bool],
    temperatures: dict[str, float],
    serving_sizes: dict[str, int],
    size_trials: dict[str, list[ServingSizeTrial]],
    record: TrainingRecord,
) -> None:
    EvaluationRecord(
        weights_sha256=record.weights_sha256(),
        split_sha256=record.split.sha256,
        temperatures=temperatures,
        serving_sizes=serving_sizes,
        serving_size_trials=size_trials,
        int8_kept=int8_kept,
        models={name: ModelFigures(val=e.val, test=e.test) for name, e in manifest.models.items()},
        cascades=manifest.cascades,
    ).write(EVALUATION_RECORD)
    log.info("int8 decisions and figures recorded in %s", EVALUATION_RECORD)


def _entry(
    built: Built,
    record: TrainingRecord,
    evaluation: Evaluation | None,
    previous: EvaluationRecord | None,
    threads: int,
    with_test: bool = True,
) -> ModelEntry:
    spec, trained = built.spec, record.models[built.spec.name]
    artifact = sources.ARTIFACTS[trained.source]
    val: QualityFigures | None = None
    test: QualityFigures | None = None
    if evaluation is not None:
        val = evaluation.metrics(built.member, "val", "val")
        test = evaluation.metrics(built.member, "test", "test") if with_test else None
    elif previous is not None and built.name in previous.models:
        val, test = previous.models[built.name].val, previous.models[built.name].test
    sess = cpu_session(built.path, threads)
    input_name, output_name = onnx_tools.io_names(built.path)
    digest = sha256_file(built.path)
    return ModelEntry(
        name=built.name,
        version=digest[:12],
        family=spec.family,
        precision=built.precision,
        derived_from=spec.name if built.name != spec.name else None,
        file=built.path.name,
        sha256=digest,
        labels=list(LABELS),
        temperature=built.temperature,
        input=InputSpec(
            name=input_name,
            height=built.size,
            width=built.size,
            in_graph_normalisation=backbones.IN_GRAPH_NORMALISATION,
        ),
        output=OutputSpec(name=output_name),
        test=test,
        val=val,
        latency=Latency(
            p50_ms_batch1=latency_p50_ms(sess, built.size, 1),
            p50_ms_batch8=latency_p50_ms(sess, built.size, 8),
            intra_op_threads=threads,
            machine=machine_description(),
            session_profile=SESSION_PROFILE,
        ),
        parameters=built.parameters,
        flops=onnx_tools.count_flops(built.path),
        parity=built.parity,
        provenance=Provenance(
            source_artifact=artifact.pinned_as,
            source_sha256=artifact.digest or "",
            trained_weights_sha256=trained.weights_sha256,
            dataset_split_sha256=record.split.sha256,
            git_commit=git_commit(),
            exporter=built.exporter,
        ),
    )


def _cascade(
    entries: dict[str, ModelEntry],
    built: dict[str, Built],
    evaluation: Evaluation | None,
    previous: EvaluationRecord | None,
) -> CascadeEntry:
    small, large = CASCADE
    if evaluation is not None:
        return measure_cascade(
            evaluation, entries[small], entries[large], built[small].member, built[large].member
        )
    saved = next((c for c in (previous.cascades if previous else []) if (c.small, c.large) == CASCADE), None)
    if saved is None:
        raise ValueError(
            "no dataset and no recorded cascade threshold for these weights: build once with --data"
        )
    return saved
