"""Static checks as part of the test command: ruff (lint + import order) and mypy (types) on the library.

Both come with the dev extra; the configuration is in pyproject.toml.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_ruff_passes() -> None:
    out = _run("ruff", "check", "fedpeft", "tests", "benchmarks")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


@pytest.mark.slow
def test_mypy_passes() -> None:
    out = _run("mypy")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_every_module_enters_torch_through_import_torch() -> None:
    """A module whose first torch import is a submodule can break Flower's two-thread app loading
    (see fedpeft/runtime.py); the Ray engine test caught it only under load."""
    import ast

    offenders = []
    for path in sorted((ROOT / "fedpeft").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module-level imports, in order
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch" for a in node.names):
                if not any(a.name == "torch" for a in node.names):
                    offenders.append(str(path.relative_to(ROOT)))
                break
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
                if node.module != "torch":
                    offenders.append(str(path.relative_to(ROOT)))
                break
    assert not offenders, f"import torch before any torch submodule in: {offenders}"


def test_every_benchmark_script_is_in_the_benchmarks_index() -> None:
    """benchmarks/README.md lists each script once, in a table row of its own: a new benchmark must say there what
    it measures, and a removed one must leave the index."""
    import re

    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "common.py")
    index = (ROOT / "benchmarks" / "README.md").read_text()
    listed = re.findall(r"^\| `([\w.]+\.py)` \|", index, flags=re.M)
    assert sorted(listed) == scripts, f"benchmarks/README.md rows {sorted(listed)} against scripts {scripts}"
