"""The split: deterministic, stratified, disjoint, and traced by a hash."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from catdog_core.sessions import CPU, OPENVINO
from model_export.data import Sample, load_images, shrunk, stratified_split


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
    assert {k: [s.path for s in v] for k, v in first.samples.items()} == {
        k: [s.path for s in v] for k, v in again.samples.items()
    }
    assert first.counts() == {
        "train": {"cat": 28, "dog": 42},
        "val": {"cat": 6, "dog": 9},
        "test": {"cat": 6, "dog": 9},
    }
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


def test_split_is_stratified_by_class_and_source_across_roots(tmp_path: Path) -> None:
    web = image_folder(tmp_path / "web", {"cat": 20, "dog": 40})
    more = tmp_path / "more"
    for label, prefix, count in (
        ("cat", "kaggle", 20),
        ("cat", "breed", 40),
        ("dog", "kaggle", 20),
        ("dog", "breed", 20),
    ):
        (more / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(more / label / f"{prefix}_{i:03d}.png")
    split = stratified_split([web, more], seed=3, fractions=(0.5, 0.25, 0.25))
    assert split.sources == ["more/breed", "more/kaggle", "web"]
    # Every (class, source) stratum is cut 50/25/25 on its own.
    for name, share in (("train", 0.5), ("val", 0.25), ("test", 0.25)):
        strata = {(s.label, s.source) for s in split.samples[name]}
        assert len(strata) == 6
        assert split.source_counts()[name] == {
            "more/breed": 60 * share,
            "more/kaggle": 40 * share,
            "web": 60 * share,
        }
    # A prefix that is the class name ("cat_001.png") is no source of its own.
    assert all(s.source == "web" for v in split.samples.values() for s in v if s.path.is_relative_to(web))


def test_adding_a_root_leaves_the_other_sources_split_unchanged(tmp_path: Path) -> None:
    web = image_folder(tmp_path / "web", {"cat": 30, "dog": 30})
    other = image_folder(tmp_path / "other", {"cat": 10, "dog": 10})
    alone, together = stratified_split([web], seed=5), stratified_split([web, other], seed=5)
    for name in ("train", "val", "test"):
        assert [s.path for s in alone.samples[name]] == [
            s.path for s in together.samples[name] if s.source == "web"
        ]


def test_roots_must_share_their_classes(tmp_path: Path) -> None:
    web = image_folder(tmp_path / "web", {"cat": 3, "dog": 3})
    birds = image_folder(tmp_path / "birds", {"cat": 3, "bird": 3})
    with pytest.raises(ValueError, match="classes"):
        stratified_split([web, birds])


def test_shrunk_photos_are_small_jpegs_of_the_same_shape(tmp_path: Path) -> None:
    original = io.BytesIO()
    Image.new("RGB", (600, 400), (200, 30, 30)).save(original, "PNG")
    small = Image.open(io.BytesIO(shrunk(original.getvalue(), 150)))
    assert small.format == "JPEG" and small.size == (150, 100)
    tiny = io.BytesIO()
    Image.new("RGB", (40, 30)).save(tiny, "PNG")
    assert Image.open(io.BytesIO(shrunk(tiny.getvalue(), 150))).size == (40, 30)  # never enlarged


def test_images_can_be_loaded_shrunk_first(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "cat").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(root / "cat" / "cat_0.png")
    sample = [Sample(root / "cat" / "cat_0.png", 0, "catdog")]
    full = load_images(sample, 64, "full").arrays
    small = load_images(sample, 64, "small", max_side=16).arrays
    assert full.shape == small.shape == (1, 64, 64, 3)
    # noise shrunk to 16 px and scaled back up loses its detail
    assert small.std() < full.std()


def test_evaluate_refuses_to_write_figures_of_shrunk_photos(tmp_path: Path) -> None:
    from model_export.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["evaluate", "--out", str(tmp_path), "--data", str(tmp_path), "--write", "--max-side", "100"])
    assert stopped.value.code == 2


def test_evaluate_refuses_to_write_figures_of_another_provider(tmp_path: Path) -> None:
    from model_export.cli import main

    for provider in ("openvino", "openvino-bf16"):
        with pytest.raises(SystemExit) as stopped:
            main(
                [
                    "evaluate",
                    "--out",
                    str(tmp_path),
                    "--data",
                    str(tmp_path),
                    "--write",
                    "--provider",
                    provider,
                ]
            )
        assert stopped.value.code == 2


@pytest.mark.parametrize(
    ("choice", "provider", "precision"),
    [("cpu", CPU, "fp32"), ("openvino", OPENVINO, "fp32"), ("openvino-bf16", OPENVINO, "bf16")],
)
def test_evaluate_runs_the_models_on_the_provider_and_precision_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, choice: str, provider: str, precision: str
) -> None:
    from model_export import cli, evaluate, records

    class Measured(Exception):
        pass

    asked: list[tuple[str, str]] = []

    def remeasure(*args: object) -> None:
        asked.append((str(args[5]), str(args[6])))
        raise Measured

    monkeypatch.setattr(evaluate, "remeasure", remeasure)
    monkeypatch.setattr(
        records, "read_training_record", lambda path: SimpleNamespace(split=SimpleNamespace(seed=0))
    )
    with pytest.raises(Measured):
        cli.main(["evaluate", "--out", str(tmp_path), "--data", str(tmp_path), "--provider", choice])
    assert asked == [(provider, precision)]
