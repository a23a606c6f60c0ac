"""docs/compatibility.md claims only what tests check: every test it names exists and passed when it was written, and
every test decorated with `@compat(...)` is on it (docs/make_compat_table.py regenerates it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_row_of_the_compatibility_page_names_an_existing_test():
    page = (ROOT / "docs" / "compatibility.md").read_text()
    node_ids = re.findall(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^\]]*\])?`", page)
    assert len(node_ids) >= 30
    for path, function in node_ids:
        assert re.search(rf"^def {function}\(", (ROOT / path).read_text(), re.MULTILINE), f"{path}::{function}"
    assert "| failed |" not in page and "| not run |" not in page, "regenerate: python docs/make_compat_table.py"


def test_every_compat_marked_test_is_on_the_page():
    page = (ROOT / "docs" / "compatibility.md").read_text()
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        source = path.read_text()
        for function in re.findall(r"@compat\([^)]*\)\s*(?:@[^\n]+\s*)*def (\w+)\(", source):
            assert f"tests/{path.name}::{function}" in page, f"{path.name}::{function} missing: regenerate the page"
