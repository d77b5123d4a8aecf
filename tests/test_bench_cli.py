"""`python -m bench` is one tool: its help lists every study, every `make bench-*` target runs
one of them, and no study leans on another (shared code lives in helper modules)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from bench.studies import STUDIES

ROOT = Path(__file__).resolve().parents[1]
STUDY_DIR = ROOT / "bench" / "studies"


def test_help_lists_every_study_with_its_line() -> None:
    out = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    for name, line in STUDIES.items():
        assert re.search(rf"^\s+{name}\s+{re.escape(line)}$", out, re.M), (name, out)


def test_every_study_module_is_listed_and_has_a_main() -> None:
    modules = {p.stem for p in STUDY_DIR.glob("*.py") if p.stem != "__init__"}
    assert modules == set(STUDIES)
    for name in modules:
        tree = ast.parse((STUDY_DIR / f"{name}.py").read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), name


def _make_targets() -> dict[str, list[str]]:
    """Each `bench-*` target of the Makefile with its recipe lines."""
    targets: dict[str, list[str]] = {}
    current = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        found = re.match(r"^(bench-[\w-]+):", line)
        if found:
            current = targets.setdefault(found.group(1), [])
        elif line.startswith("\t") and current is not None:
            current.append(line.strip())
        elif not line.startswith("\t"):
            current = None
    return targets


def test_every_bench_make_target_runs_a_study() -> None:
    targets = _make_targets()
    assert {f"bench-{name}" for name in STUDIES} <= set(targets)
    for target, recipe in targets.items():
        runs = [re.match(r"^\$\(BIN\)/python -m bench (\w+)\b", line) for line in recipe]
        studies = [m.group(1) for m in runs if m]
        assert len(studies) == 1 and studies[0] in STUDIES, (target, recipe)


def test_no_study_imports_another() -> None:
    for path in STUDY_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("bench.studies.") for n in names), (path.name, names)
            if isinstance(node, ast.ImportFrom) and node.module == "bench.studies":
                assert all(a.name not in STUDIES for a in node.names), path.name
