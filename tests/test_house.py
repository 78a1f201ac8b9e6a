"""The house checks CI runs before the tests: the linter, the formatter check and the strict docs build.

They live in the test suite so that `.ci/run` stays exactly README's test command; conftest.py moves them to the
front of the run. Each runs the tool of this environment (`python -m ...`) on the repository and fails with the
tool's own output. A tool that is not installed skips its test with the reason (the `test` extra installs all).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_tool(module: str, *args: str) -> None:
    """Run `python -m module args` in the repository root; fail with its output unless it exits 0."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]' installs it)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner, not a build problem
    done = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        command = " ".join([module, *args])
        pytest.fail(f"`{command}` exited {done.returncode}:\n{done.stdout}{done.stderr}", pytrace=False)


def test_ruff_check():
    run_tool("ruff", "check", ".")


def test_ruff_format():
    run_tool("ruff", "format", "--check", ".")


def test_docs_build_strict(tmp_path):
    """`mkdocs build --strict` (mkdocs.yml): a broken link or anchor, or a docstring griffe cannot read, fails."""
    run_tool("mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"))
