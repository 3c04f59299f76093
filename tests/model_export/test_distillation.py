"""Distillation: the teacher's calibrated answer on the very view the student trains on."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from catdog_core.preprocessing import to_array
from catdog_core.probabilities import softmax
from catdog_core.sessions import cpu_session
from model_export.data import Sample, iter_decoded
from model_export.teacher import Teacher, blended_targets
from model_export.train import TrainConfig
from model_export.training_run import train_all
from tests.support import write_tiny_models

if TYPE_CHECKING:
    from model_export.backbones import Backbone

keras = pytest.importorskip("keras")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Teacher:
    folder = tmp_path_factory.mktemp("build")
    write_tiny_models(folder, heavy_layers=0)
    return Teacher.from_build(folder / "fast.onnx")


def test_blended_targets_mix_the_label_and_the_teacher() -> None:
    labels = np.array([0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.8, 0.2]], np.float32)  # the teacher disagrees on the last
    assert np.array_equal(blended_targets(labels, 2, probs, 0.0), np.eye(2)[labels])
    half = blended_targets(labels, 2, probs, 0.5)
    np.testing.assert_allclose(half, [[0.95, 0.05], [0.15, 0.85], [0.4, 0.6]], rtol=1e-6)
    np.testing.assert_allclose(half.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(blended_targets(labels, 2, probs, 1.0), probs)


def test_a_distilled_run_without_teacher_probabilities_is_an_error() -> None:
    with pytest.raises(ValueError, match="teacher"):
        blended_targets(np.array([0, 1]), 2, None, 0.5)
    with pytest.raises(ValueError, match="teacher probabilities"):
        blended_targets(np.array([0, 1]), 2, np.ones((3, 2), np.float32) / 2, 0.5)


def test_the_teacher_answers_with_its_manifest_temperature(teacher: Teacher) -> None:
    assert teacher.member.name == "fast" and teacher.member.temperature == 1.5 and teacher.member.size == 32
    images = np.stack([np.full((32, 32, 3), colour, np.uint8) for colour in ((250, 20, 20), (20, 20, 250))])
    session = cpu_session(teacher.member.path, 1)
    logits = session.run(None, {"image": images})[0]
    probs = teacher.predictor(1)(images)
    np.testing.assert_allclose(probs, softmax(logits, 1.5), rtol=1e-5)
    assert not np.allclose(probs[0], probs[1])  # it does look at the image


def test_a_teacher_file_that_is_not_the_one_its_manifest_describes_is_refused(tmp_path: Path) -> None:
    write_tiny_models(tmp_path, heavy_layers=0)
    with (tmp_path / "fast.onnx").open("ab") as file:
        file.write(b"\0")
    with pytest.raises(ValueError, match="sha256"):
        Teacher.from_build(tmp_path / "fast.onnx")
    with pytest.raises(FileNotFoundError, match="make models"):
        Teacher.from_build(tmp_path / "absent.onnx")


def test_training_a_distilled_model_without_a_teacher_fails_before_any_work(tmp_path: Path) -> None:
    # No dataset at all: the check must come before the split and hours of feature extraction.
    with pytest.raises(ValueError, match="--teacher"):
        train_all([tmp_path / "no-such-root"], TrainConfig(), tmp_path, ["mobilenet"])


def _tiny_backbone_and_photos(tmp_path: Path) -> tuple[Backbone, list[Sample]]:
    from model_export.backbones import Backbone

    inputs = keras.Input((32, 32, 3))
    trunk = keras.Model(inputs, keras.layers.Conv2D(4, 3, strides=2)(inputs))
    backbone = Backbone("tiny", 32, trunk, [keras.layers.Conv2D(4, 1, name="top_conv")])
    samples = []
    for index, colour in enumerate(((240, 30, 30), (30, 30, 240))):
        path = tmp_path / f"photo{index}.jpg"
        pixels = np.random.default_rng(index).integers(0, 60, (48, 64, 3)) + np.array(colour) // 2
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        samples.append(Sample(path, index, "tiny"))
    return backbone, samples


def test_every_training_view_gets_the_teacher_answer_on_that_view(teacher: Teacher, tmp_path: Path) -> None:
    from model_export.features import trunk_activations

    backbone, samples = _tiny_backbone_and_photos(tmp_path)
    features = trunk_activations(backbone, samples, 2, 0, tmp_path / "cache", "tiny", 1, teacher=teacher)

    assert features.teacher_probs is not None
    assert features.teacher_probs.shape == (6, 2) and len(features.activations) == 6
    originals = [to_array(image, (32, 32)) for _, image in iter_decoded(samples, 32)]
    expected = teacher.predictor(1)(np.stack(originals))
    np.testing.assert_allclose(features.teacher_probs[[0, 3]], expected, rtol=1e-5)
    # The augmented views differ from the original, and the teacher's answers follow them.
    assert not np.allclose(features.teacher_probs[1], features.teacher_probs[0])
    cached = trunk_activations(backbone, samples, 2, 0, tmp_path / "cache", "tiny", 1, teacher=teacher)
    assert cached.teacher_probs is not None
    np.testing.assert_array_equal(cached.teacher_probs, features.teacher_probs)
    without = trunk_activations(backbone, samples, 2, 0, tmp_path / "cache", "tiny", 1)
    assert without.teacher_probs is None
    np.testing.assert_array_equal(without.activations, features.activations)


def test_a_feature_cache_write_that_fails_halfway_leaves_nothing_to_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk stopped `make train` while it saved 4.7 GB of features: the 3 GB it had written
    stayed under the cache's name, and the next run would have read them as the features."""
    from model_export.features import trunk_activations

    backbone, samples = _tiny_backbone_and_photos(tmp_path)
    cache = tmp_path / "cache"

    def disk_fills(file: Path, **arrays: np.ndarray) -> None:
        Path(file).write_bytes(b"PK\x03\x04 the first bytes of a zip")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(np, "savez", disk_fills)
        with pytest.raises(OSError, match="No space"):
            trunk_activations(backbone, samples, 1, 0, cache, "tiny", 1)
    assert list((cache / "features").iterdir()) == []
    features = trunk_activations(backbone, samples, 1, 0, cache, "tiny", 1)
    assert len(features.activations) == 4
    assert [path.suffix for path in (cache / "features").iterdir()] == [".npz"]
