"""The docs quote figures only from the recorded benchmark run, and their links lead somewhere."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = runpy.run_path(str(ROOT / "benchmarks" / "cpu_suite.py"), run_name="cpu_suite")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RECORDED = SUITE["regions"]((ROOT / "docs" / "benchmarks.md").read_text())


def test_the_benchmark_page_records_every_cpu_benchmark():
    assert [b.name for b in SUITE["BENCHMARKS"]] == list(RECORDED), "run: python benchmarks/cpu_suite.py --update-docs"


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "benchmarks.md"], ids=lambda p: p.name)
def test_quoted_figures_are_the_recorded_run(page):
    quoted = SUITE["regions"](page.read_text())
    for name, text in quoted.items():
        assert name in RECORDED, f"{page.name} quotes cpu-suite:{name}, which docs/benchmarks.md does not record"
        assert text == RECORDED[name], f"{page.name}'s cpu-suite:{name} differs from docs/benchmarks.md: rerun it"


def test_copy_regions_rewrites_only_the_named_regions():
    recorded = {"a": "<!-- cpu-suite:a -->new<!-- /cpu-suite:a -->"}
    text = "x <!-- cpu-suite:a -->old<!-- /cpu-suite:a --> y <!-- cpu-suite:b -->keep<!-- /cpu-suite:b -->"
    assert SUITE["copy_regions"](recorded, text) == (
        "x <!-- cpu-suite:a -->new<!-- /cpu-suite:a --> y <!-- cpu-suite:b -->keep<!-- /cpu-suite:b -->"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_lead_to_files_that_exist(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_architecture_page_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    modules = sorted((ROOT / "flux_small_encoder").rglob("*.py"))
    missing = [str(m.relative_to(ROOT)) for m in modules
               if m.name not in ("__init__.py", "__main__.py") and not re.search(rf"\b{re.escape(m.name)}\b", page)]
    assert not missing, f"docs/architecture.md's map does not name {missing}"
