"""The dataset: ImageFolder trees, a deterministic split stratified by class and source, loading.

Several roots can be given (one folder per class in each). A photo's *source* is its root's folder
name, refined by a file-name prefix where the root mixes sources (``kaggle_123.jpg`` in
``catdog-more`` is source ``catdog-more/kaggle``); a prefix that is just the class name
(``cat_0001.jpg``) is no source. Each (class, source) stratum's sorted files are shuffled with a
fixed seed and cut into train/val/test by fixed fractions, so every split has the class and source
mix of the whole and per-source figures can be reported. The split's identity (which file went
where, and each file's content hash) is hashed into one sha256 that the manifest records, so a
figure can always be traced to the exact images it was measured on.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from catdog_core.preprocessing import to_array
from service.errors import ImageTooLarge, InvalidImage
from service.imaging import decode

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
DEFAULT_SEED = 20261123


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    source: str = ""


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

    def source_counts(self) -> dict[str, dict[str, int]]:
        """{split: {source: images}}."""
        return {
            name: dict(sorted(Counter(s.source for s in items).items()))
            for name, items in self.samples.items()
        }

    @property
    def sources(self) -> list[str]:
        return sorted({s.source for items in self.samples.values() for s in items})


def discover_labels(root: Path) -> list[str]:
    labels = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(labels) < 2:
        raise ValueError(f"{root} needs one folder per class (at least two); found {labels}")
    return labels


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def source_of(root: Path, path: Path, labels: Sequence[str]) -> str:
    prefix, sep, _ = path.stem.partition("_")
    if sep and prefix and prefix not in labels:
        return f"{root.name}/{prefix}"
    return root.name


def _common_labels(roots: Sequence[Path]) -> list[str]:
    if not roots:
        raise ValueError("at least one data root is needed")
    labels = discover_labels(roots[0])
    for root in roots[1:]:
        if discover_labels(root) != labels:
            raise ValueError(f"{root} has classes {discover_labels(root)}, {roots[0]} has {labels}")
    if len({root.resolve().name for root in roots}) != len(roots):
        raise ValueError("data roots must have distinct folder names (they name the sources)")
    return labels


def all_samples(roots: Sequence[Path]) -> tuple[list[str], list[Sample]]:
    """Every image under the roots, labelled and tagged with its source."""
    labels = _common_labels(roots)
    samples = [
        Sample(path, index, source_of(root, path, labels))
        for root in roots
        for index, label in enumerate(labels)
        for path in list_images(root / label)
    ]
    return labels, samples


def stratified_split(
    roots: Path | Sequence[Path],
    seed: int = DEFAULT_SEED,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> Split:
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) <= 0:
        raise ValueError(f"split fractions must be positive and sum to 1, got {fractions}")
    roots = [roots] if isinstance(roots, Path) else list(roots)
    labels, samples = all_samples(roots)
    split = Split(labels, seed, fractions, {name: [] for name in SPLITS})
    strata = sorted({(s.label, s.source) for s in samples})
    for label, source in strata:
        members = [s for s in samples if (s.label, s.source) == (label, source)]
        # The stratum's own seed depends on its name, not its position: adding a source leaves the
        # split of the others unchanged.
        stratum_seed = int.from_bytes(hashlib.sha256(f"{labels[label]}|{source}".encode()).digest()[:4])
        order = np.random.default_rng([seed, stratum_seed]).permutation(len(members))
        n_train = round(fractions[0] * len(members))
        n_val = round(fractions[1] * len(members))
        bounds = {
            "train": (0, n_train),
            "val": (n_train, n_train + n_val),
            "test": (n_train + n_val, len(members)),
        }
        for name, (lo, hi) in bounds.items():
            split.samples[name].extend(members[i] for i in sorted(order[lo:hi]))
    split.sha256 = split_hash(roots, split)
    return split


def split_hash(roots: Sequence[Path], split: Split) -> str:
    """sha256 over (split, source, path below its root, content sha256) of every file, in order."""
    digest = hashlib.sha256(f"seed={split.seed};fractions={split.fractions}\n".encode())
    for name in SPLITS:
        for sample in split.samples[name]:
            root = next(r for r in roots if sample.path.is_relative_to(r))
            content = hashlib.sha256(sample.path.read_bytes()).hexdigest()
            relative = sample.path.relative_to(root).as_posix()
            digest.update(f"{name}\t{sample.source}\t{relative}\t{content}\n".encode())
    return digest.hexdigest()


@dataclass
class LoadedImages:
    arrays: np.ndarray  # N x H x W x 3 uint8
    labels: np.ndarray  # N int64
    paths: list[Path]
    skipped: list[tuple[Path, str]]
    sources: list[str] = field(default_factory=list)


SHRUNK_JPEG_QUALITY = 75


def shrunk(blob: bytes, max_side: int) -> bytes:
    """The photo at most max_side px on its longer side (aspect kept, never enlarged), saved
    again as JPEG at quality 75: what a thumbnail or a small web photo looks like."""
    with Image.open(io.BytesIO(blob)) as image:
        small = image.convert("RGB")
    small.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=SHRUNK_JPEG_QUALITY)
    return out.getvalue()


def iter_decoded(
    samples: Iterable[Sample], size: int, max_side: int | None = None
) -> Iterator[tuple[Sample, object]]:
    """Yield (sample, PIL image or the reason it failed). Corrupt files are reported, not fatal.
    With max_side, each photo is first shrunk (`shrunk`)."""
    for sample in samples:
        try:
            blob = sample.path.read_bytes()
            yield sample, decode(shrunk(blob, max_side) if max_side else blob, (size, size))
        except (InvalidImage, ImageTooLarge, OSError) as exc:
            yield sample, f"{type(exc).__name__}: {exc}"


def load_images(samples: list[Sample], size: int, desc: str, max_side: int | None = None) -> LoadedImages:
    arrays, labels, paths, sources, skipped = [], [], [], [], []
    decoded = iter_decoded(samples, size, max_side)
    for sample, image in tqdm(decoded, total=len(samples), desc=desc, unit="img"):
        if isinstance(image, str):
            skipped.append((sample.path, image))
            continue
        arrays.append(to_array(image, (size, size)))
        labels.append(sample.label)
        paths.append(sample.path)
        sources.append(sample.source)
    if skipped:
        log.warning("%s: skipped %d unreadable files, e.g. %s", desc, len(skipped), skipped[0])
    stacked = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return LoadedImages(stacked, np.asarray(labels, dtype=np.int64), paths, skipped, sources)
