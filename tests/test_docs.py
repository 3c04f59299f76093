"""The README documents every setting the service reads, once in its settings table, and the
documents' links lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.settings import Settings
from tests.support import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RELATIVE_LINK = re.compile(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)")  # [text](path) or ![alt](path), no URLs


def test_readme_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`CATDOG_{name.upper()}`" not in readme]
    assert not missing, f"README lacks settings: {missing}"


def test_the_settings_table_has_one_row_per_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Settings\n", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `CATDOG_([A-Z0-9_]+)` \|", section, flags=re.MULTILINE)
    assert sorted(rows) == sorted(name.upper() for name in Settings.model_fields)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_relative_link_and_image_exists(document: Path) -> None:
    targets = RELATIVE_LINK.findall(document.read_text())
    missing = [target for target in targets if not (document.parent / target).exists()]
    assert not missing, f"{document.name} links to files that do not exist: {missing}"
