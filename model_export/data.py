"""The dataset: an ImageFolder tree, a deterministic stratified split, and image loading.

Split: for each class the sorted file names are shuffled with a fixed seed and cut into
train/val/test by fixed fractions, so every split has the class balance of the whole. The split's
identity (which file went where, and each file's content hash) is hashed into one sha256 that the
manifest records, so a figure can always be traced to the exact images it was measured on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.errors import ImageTooLarge, InvalidImage
from service.imaging import decode, to_array

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class Split:
    labels: list[str]
    seed: int
    fractions: tuple[float, float, float]
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    sha256: str = ""

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            name: {label: sum(s.label == i for s in items) for i, label in enumerate(self.labels)}
            for name, items in self.samples.items()
        }


def discover_labels(root: Path) -> list[str]:
    labels = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(labels) < 2:
        raise ValueError(f"{root} needs one folder per class (at least two); found {labels}")
    return labels


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def stratified_split(
    root: Path, seed: int = 20261123, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
) -> Split:
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) <= 0:
        raise ValueError(f"split fractions must be positive and sum to 1, got {fractions}")
    labels = discover_labels(root)
    split = Split(labels, seed, fractions, {name: [] for name in SPLITS})
    for index, label in enumerate(labels):
        files = list_images(root / label)
        order = np.random.default_rng([seed, index]).permutation(len(files))
        n_train = round(fractions[0] * len(files))
        n_val = round(fractions[1] * len(files))
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
                  "test": (n_train + n_val, len(files))}
        for name, (lo, hi) in bounds.items():
            split.samples[name].extend(Sample(files[i], index) for i in sorted(order[lo:hi]))
    split.sha256 = split_hash(root, split)
    return split


def split_hash(root: Path, split: Split) -> str:
    """sha256 over (split, relative path, content sha256) of every file, in a fixed order."""
    digest = hashlib.sha256(f"seed={split.seed};fractions={split.fractions}\n".encode())
    for name in SPLITS:
        for sample in split.samples[name]:
            content = hashlib.sha256(sample.path.read_bytes()).hexdigest()
            digest.update(f"{name}\t{sample.path.relative_to(root).as_posix()}\t{content}\n".encode())
    return digest.hexdigest()


@dataclass
class LoadedImages:
    arrays: np.ndarray  # N x H x W x 3 uint8
    labels: np.ndarray  # N int64
    paths: list[Path]
    skipped: list[tuple[Path, str]]


def iter_decoded(samples: Iterable[Sample], size: int) -> Iterator[tuple[Sample, object]]:
    """Yield (sample, PIL image or the reason it failed). Corrupt files are reported, not fatal."""
    for sample in samples:
        try:
            yield sample, decode(sample.path.read_bytes(), (size, size))
        except (InvalidImage, ImageTooLarge, OSError) as exc:
            yield sample, f"{type(exc).__name__}: {exc}"


def load_images(samples: list[Sample], size: int, desc: str) -> LoadedImages:
    arrays, labels, paths, skipped = [], [], [], []
    for sample, image in tqdm(iter_decoded(samples, size), total=len(samples), desc=desc, unit="img"):
        if isinstance(image, str):
            skipped.append((sample.path, image))
            continue
        arrays.append(to_array(image, (size, size)))  # type: ignore[arg-type]
        labels.append(sample.label)
        paths.append(sample.path)
    if skipped:
        log.warning("%s: skipped %d unreadable files, e.g. %s", desc, len(skipped), skipped[0])
    stacked = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return LoadedImages(stacked, np.asarray(labels, dtype=np.int64), paths, skipped)
