"""The README documents every setting the service reads."""

from __future__ import annotations

from service.settings import Settings
from tests.support import ROOT


def test_readme_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`CATDOG_{name.upper()}`" not in readme]
    assert not missing, f"README lacks settings: {missing}"
