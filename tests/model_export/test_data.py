"""The split: deterministic, stratified, disjoint, and traced by a hash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_export.data import load_images, stratified_split


def image_folder(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for label, count in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{label}_{i:03d}.png")
    return root


def test_split_is_deterministic_stratified_and_disjoint(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "data", {"cat": 40, "dog": 60})
    first, again = stratified_split(root, seed=7), stratified_split(root, seed=7)
    assert first.sha256 == again.sha256
    assert {k: [s.path for s in v] for k, v in first.samples.items()} == \
        {k: [s.path for s in v] for k, v in again.samples.items()}
    assert first.counts() == {"train": {"cat": 28, "dog": 42}, "val": {"cat": 6, "dog": 9},
                              "test": {"cat": 6, "dog": 9}}
    all_paths = [s.path for v in first.samples.values() for s in v]
    assert len(all_paths) == len(set(all_paths)) == 100


def test_another_seed_gives_another_split_and_hash(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "data", {"cat": 30, "dog": 30})
    a, b = stratified_split(root, seed=1), stratified_split(root, seed=2)
    assert a.sha256 != b.sha256
    assert [s.path for s in a.samples["test"]] != [s.path for s in b.samples["test"]]


def test_changed_file_content_changes_the_hash(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "data", {"cat": 10, "dog": 10})
    before = stratified_split(root, seed=1).sha256
    Image.new("RGB", (8, 8)).save(root / "cat" / "cat_000.png")
    assert stratified_split(root, seed=1).sha256 != before


def test_corrupt_files_are_skipped_and_counted(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "data", {"cat": 5, "dog": 5})
    (root / "dog" / "dog_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    split = stratified_split(root, seed=1, fractions=(0.34, 0.33, 0.33))
    samples = [s for v in split.samples.values() for s in v]
    loaded = load_images(samples, 16, "test")
    assert len(loaded.skipped) == 1 and loaded.skipped[0][0].name == "dog_broken.png"
    assert loaded.arrays.shape == (10, 16, 16, 3)


def test_bad_fractions_are_refused(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "data", {"cat": 3, "dog": 3})
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(root, fractions=(0.5, 0.5, 0.5))
