"""Every module imports: a broken import must fail fast, not only in the slow test that uses it."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import bench
import model_export
import service

MODULES = sorted(
    info.name
    for package in (service, model_export, bench)
    for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}.")
    if not info.name.startswith("bench.baselines.")  # baselines start servers or need litserve
    and info.name
    not in (
        "service.__main__",
        "model_export.__main__",
        "bench.__main__",
        # a locustfile: Locust (the bench extra) runs it with its settings in the environment
        "bench.open_loop_locustfile",
    )
)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name: str) -> None:
    importlib.import_module(name)
