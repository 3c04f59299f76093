"""Bottleneck features: the frozen trunk's activations, computed once per image view and cached.

The trunk runs in onnxruntime rather than TensorFlow: on two CPU cores it is about three times
faster for Xception, and it is the same engine the service uses.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance
from tqdm import tqdm

from catdog_core.preprocessing import to_array
from catdog_core.sessions import cpu_session
from model_export.backbones import Backbone
from model_export.data import Sample, iter_decoded
from model_export.files import whole_or_nothing
from model_export.onnx_tools import export_keras
from model_export.teacher import Teacher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Augmentation:
    """Strong, photo-like augmentation: each view is a plausible other photo of the same animal.

    The hidden test photos come from other cameras and sites than the training photos, so the
    views vary what differs between sources: framing (crops down to a third of the area), mirror
    image, exposure and colour, camera tilt, low resolution (60-150 px thumbnails scaled back up)
    and JPEG compression.
    """

    min_area: float = 0.33
    max_rotation_deg: float = 12.0
    jitter: float = 0.3  # brightness, contrast and saturation factors in 1 +- jitter
    p_low_resolution: float = 0.25
    low_resolution_px: tuple[int, int] = (60, 150)
    p_jpeg: float = 0.5
    jpeg_quality: tuple[int, int] = (30, 95)


def _random_resized_crop(image: Image.Image, rng: np.random.Generator, min_area: float) -> Image.Image:
    width, height = image.size
    for _ in range(10):
        area = width * height * rng.uniform(min_area, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        crop_w, crop_h = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            return image.crop((left, top, left + crop_w, top + crop_h))
    return image


def _colour_jitter(image: Image.Image, rng: np.random.Generator, jitter: float) -> Image.Image:
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    for index in rng.permutation(len(enhancers)):
        image = enhancers[index](image).enhance(float(rng.uniform(1 - jitter, 1 + jitter)))
    return image


def _low_resolution(image: Image.Image, rng: np.random.Generator, sizes: tuple[int, int]) -> Image.Image:
    longest = int(rng.integers(sizes[0], sizes[1] + 1))
    scale = longest / max(image.size)
    if scale >= 1:
        return image
    small = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(small, Image.Resampling.BILINEAR)  # scaled back up by the input resize


def _jpeg(image: Image.Image, rng: np.random.Generator, qualities: tuple[int, int]) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(qualities[0], qualities[1] + 1)))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def augment(image: Image.Image, rng: np.random.Generator, aug: Augmentation = Augmentation()) -> Image.Image:
    """One random view: rotation, crop, flip, colour, then the low-resolution and JPEG artefacts."""
    angle = float(rng.uniform(-aug.max_rotation_deg, aug.max_rotation_deg))
    # Rotating and then cropping the central 80 % keeps most of the filled-in corners out.
    rotated = image.rotate(angle, Image.Resampling.BILINEAR, fillcolor=(124, 116, 104))
    inset_w, inset_h = round(image.width * 0.1), round(image.height * 0.1)
    image = rotated.crop((inset_w, inset_h, image.width - inset_w, image.height - inset_h))
    image = _random_resized_crop(image, rng, aug.min_area)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = _colour_jitter(image, rng, aug.jitter)
    if rng.random() < aug.p_low_resolution:
        image = _low_resolution(image, rng, aug.low_resolution_px)
    if rng.random() < aug.p_jpeg:
        image = _jpeg(image, rng, aug.jpeg_quality)
    return image


def trunk_onnx(backbone: Backbone, cache_dir: Path) -> Path:
    import keras

    path = cache_dir / "trunks" / f"{backbone.family}-{backbone.input_size}-to-{backbone.cut_layer}.onnx"
    if not path.exists():
        size = backbone.input_size
        image = keras.Input((size, size, 3), dtype="uint8", name="image")
        scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(image)
        with whole_or_nothing(path) as partial:
            export_keras(keras.Model(image, backbone.trunk(scaled)), partial)
    return path


def _views(
    image: Image.Image, n_augmented: int, rng: np.random.Generator, aug: Augmentation
) -> list[Image.Image]:
    return [image] + [augment(image, rng, aug) for _ in range(n_augmented)]


@dataclass
class Features:
    """Trunk activations of every view, with each view's label and its photo's source."""

    activations: np.ndarray  # fp16 [views, ...]
    labels: np.ndarray
    sources: np.ndarray  # str
    teacher_probs: np.ndarray | None = None  # float32 [views, labels]: the teacher on the same view


def trunk_activations(
    backbone: Backbone,
    samples: list[Sample],
    n_augmented: int,
    seed: int,
    cache_dir: Path,
    desc: str,
    threads: int = 2,
    aug: Augmentation = Augmentation(),
    teacher: Teacher | None = None,
) -> Features:
    """Activations of each photo's original view, then its n_augmented random views (cached).

    With a teacher, also its probabilities on each view: the teacher must see the very view the
    student trains on, so they cannot be computed apart (the views are random and not stored).
    """
    key = hashlib.sha256(
        repr(
            (
                backbone.family,
                backbone.input_size,
                backbone.cut_layer,
                [str(s.path) for s in samples],
                n_augmented,
                seed,
                aug,
                teacher.sha256 if teacher else None,
            )
        ).encode()
    ).hexdigest()[:16]
    cached = cache_dir / "features" / f"{backbone.family}-{backbone.input_size}-{desc}-{key}.npz"
    if cached.exists():
        with np.load(cached) as saved:
            probs = saved.get("teacher_probs")
            return Features(saved["activations"], saved["labels"], saved["sources"], probs)
    sess = cpu_session(trunk_onnx(backbone, cache_dir), threads)
    teacher_probabilities = teacher.predictor(threads) if teacher else None
    input_name = sess.get_inputs()[0].name
    size = (backbone.input_size, backbone.input_size)
    rng = np.random.default_rng(seed)
    activations: list[np.ndarray] = []
    labels: list[int] = []
    sources: list[str] = []
    teacher_probs: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    pending_teacher: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            activations.append(sess.run(None, {input_name: np.stack(pending)})[0].astype(np.float16))
            pending.clear()
        if pending_teacher and teacher_probabilities:
            teacher_probs.append(teacher_probabilities(np.stack(pending_teacher)))
            pending_teacher.clear()

    for sample, image in tqdm(
        iter_decoded(samples, backbone.input_size), total=len(samples), desc=desc, unit="img"
    ):
        if isinstance(image, str):
            log.warning("skipping %s: %s", sample.path, image)
            continue
        for view in _views(image, n_augmented, rng, aug):
            pending.append(to_array(view, size))
            if teacher:
                pending_teacher.append(to_array(view, (teacher.member.size, teacher.member.size)))
            labels.append(sample.label)
            sources.append(sample.source)
        if len(pending) >= 16:
            flush()
    flush()
    result = Features(
        np.concatenate(activations),
        np.asarray(labels, dtype=np.int64),
        np.asarray(sources),
        np.concatenate(teacher_probs) if teacher else None,
    )
    cached.parent.mkdir(parents=True, exist_ok=True)
    extra = {"teacher_probs": result.teacher_probs} if teacher else {}
    arrays = {"activations": result.activations, "labels": result.labels, "sources": result.sources}
    with whole_or_nothing(cached) as partial:
        np.savez(partial, **arrays, **extra)
    if teacher is not None and result.teacher_probs is not None:
        agreement = float((result.teacher_probs.argmax(1) == result.labels).mean())
        name = teacher.member.name
        log.info("%s: teacher %s agrees with the label on %.2f %% of views", desc, name, 100 * agreement)
    return result
