"""Fixtures shared by the tests; the helpers they use live in tests/support.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import catdog_core  # noqa: F401  (first: onnxruntime telemetry off before any test imports onnxruntime)
from tests.support import Server, run_server, write_tiny_models


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-models")
    write_tiny_models(folder)
    return folder


@pytest.fixture(scope="session")
def slower_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like tiny_models_dir, but 'slow' takes a few hundred ms per image: room to act mid-flight."""
    folder = tmp_path_factory.mktemp("slower-models")
    write_tiny_models(folder, heavy_layers=120)
    return folder


@pytest.fixture(scope="module")
def tiny_server(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tiny_models_dir, tmp_path_factory.mktemp("server")) as server:
        yield server
