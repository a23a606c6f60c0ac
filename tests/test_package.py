"""The package as a whole: what importing it and the CLI's light commands cost, and its import graph."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flux_small_encoder"
HEAVY = ("torch", "transformers", "diffusers")


# --- what a fresh process imports ------------------------------------------------------------------------------------


def heavy_modules_after(code: str) -> list[str]:
    """The heavy libraries in `sys.modules` after running `code` in a fresh Python (from this checkout)."""
    script = f"{code}\nimport json, sys\nprint(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_importing_the_package_loads_no_heavy_library():
    assert heavy_modules_after("import flux_small_encoder") == []


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["list"]], ids=" ".join)
def test_light_commands_load_no_heavy_library(argv):
    code = f"from flux_small_encoder.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert heavy_modules_after(code) == []


@pytest.mark.slow
def test_a_saved_patched_pipeline_loads_in_a_fresh_process(make_pipe, student, tmp_path):
    """diffusers looks up `flux_small_encoder.modeling` (named in model_index.json) among imported modules only: the
    package's stand-in for it must be there after a plain `import flux_small_encoder`."""
    from flux_small_encoder import patch_encoder

    patch_encoder(make_pipe(), student).save_pretrained(tmp_path / "pipe")
    code = (
        "import flux_small_encoder\nfrom diffusers import FluxPipeline\n"
        f"encoder = FluxPipeline.from_pretrained({str(tmp_path / 'pipe')!r}).text_encoder_2\n"
        "print(type(encoder).__module__, type(encoder).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["flux_small_encoder.modeling", "DistilledT5EncoderModel"]


# --- the import graph ------------------------------------------------------------------------------------------------


def module_name(path: Path, package_dir: Path) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    """Every import statement that runs: at module level and inside functions; not under `if TYPE_CHECKING:`."""

    def __init__(self):
        self.imports: list[ast.Import | ast.ImportFrom] = []

    def visit_If(self, node: ast.If):
        if _is_type_checking(node.test):
            for statement in node.orelse:
                self.visit(statement)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import):
        self.imports.append(node)

    def visit_ImportFrom(self, node: ast.ImportFrom):
        self.imports.append(node)


def import_graph(package_dir: Path) -> dict[str, dict[str, int]]:
    """Module of the package -> {module of the package it imports: line of that import}, read from the source."""
    files = {module_name(path, package_dir): path for path in sorted(package_dir.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        collector = _ImportCollector()
        collector.visit(ast.parse(path.read_text(), str(path)))
        # A package's relative imports start from itself, a module's from its package.
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph[name] = {}
        for node in collector.imports:
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                base = ".".join([*base, *([node.module] if node.module else [])])
                # `from x import y` imports the module `x.y` where there is one, else the name `y` of `x`.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            for target in targets:
                while target not in files and "." in target:  # `import a.b.name`: the module `a.b`
                    target = target.rpartition(".")[0]
                if target in files and target != name:
                    edges.setdefault(target, node.lineno)
    return graph


def cycle_through(graph: dict[str, dict[str, int]], start: str) -> list[str] | None:
    """The shortest import cycle through `start`, as `[start, ..., start]`, or `None` when there is none."""
    paths = {start: [start]}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for target in graph[module]:
            if target == start:
                return [*paths[module], start]
            if target not in paths:
                paths[target] = [*paths[module], target]
                queue.append(target)
    return None


def describe_cycle(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    """`a (line 3) -> b (line 40) -> a`: each module with the line of its import of the next."""
    steps = [f"{module} (line {graph[module][cycle[i + 1]]})" for i, module in enumerate(cycle[:-1])]
    return " -> ".join([*steps, cycle[-1]])


def test_the_graph_reads_every_kind_of_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from . import a\n",
        "a.py": "import os\n\ndef f():\n    from .sub.d import g\n    from . import b\n",
        "b.py": "import pkg.a\n",
        "c.py": "import typing\nif typing.TYPE_CHECKING:\n    from .a import f\nelse:\n    from . import sub\n",
        "sub/__init__.py": "",
        "sub/d.py": "from ..c import y\nfrom .. import b\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    graph = import_graph(package)
    assert graph == {
        "pkg": {"pkg.a": 1},
        "pkg.a": {"pkg.sub.d": 4, "pkg.b": 5},
        "pkg.b": {"pkg.a": 1},
        "pkg.c": {"pkg.sub": 5},
        "pkg.sub": {},
        "pkg.sub.d": {"pkg.c": 1, "pkg.b": 2},
    }
    assert describe_cycle(graph, cycle_through(graph, "pkg.a")) == "pkg.a (line 5) -> pkg.b (line 1) -> pkg.a"
    assert cycle_through(graph, "pkg.c") is None


GRAPH = import_graph(PACKAGE)


@pytest.mark.parametrize("module", list(GRAPH))
def test_no_import_cycle_through(module):
    cycle = cycle_through(GRAPH, module)
    assert cycle is None, f"import cycle (with the line of each import): {describe_cycle(GRAPH, cycle)}"
