"""The opt-in suite's shared pieces: where each engine's interpreter is, and the `engine` marker.

`make engines` installs each engine into its own virtualenv, `.kvgate/engines/<engine>`
(KVGATE_ENGINES_DIR moves the root; KVGATE_<ENGINE>_PYTHON names one interpreter directly).
A missing engine fails its test with the command that installs it: a skipped engine would read
as a passing one.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.local_harness import REPO

ENGINES_DIR = Path(os.environ.get("KVGATE_ENGINES_DIR", REPO / ".kvgate" / "engines"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here needs a real model server: `make e2e-engines` selects them by marker."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.engine)


def engine_python(engine: str) -> str:
    """The interpreter of `engine`'s virtualenv (an absolute path), or a failure saying how to
    install it."""
    given = os.environ.get(f"KVGATE_{engine.upper()}_PYTHON")
    python = Path(given) if given else ENGINES_DIR / engine / "bin" / "python"
    if not os.access(python, os.X_OK):
        pytest.fail(f"{python} not found: install the engine with `make engines ENGINES={engine}`")
    return str(python.absolute())


def run_python(python: str, code: str, timeout: float = 1800) -> str:
    """Run `code` in an engine's interpreter (what only its packages can do) and return stdout."""
    done = subprocess.run([python, "-c", code], text=True, capture_output=True, timeout=timeout)
    assert done.returncode == 0, f"{python} -c ... failed:\n{done.stderr[-4000:]}"
    return done.stdout.strip()


def package_dir(python: str, module: str) -> Path:
    """Where an installed package's files are: the model packages ship their weights there."""
    return Path(run_python(python, "import importlib.util as u; "
                                   f"print(u.find_spec({module!r}).submodule_search_locations[0])"))
