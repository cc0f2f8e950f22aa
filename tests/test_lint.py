"""The tree stays formatted and lint-clean (ruff, configured in pyproject.toml: 100 columns)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_passes_on_the_tree(args: list[str]) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "ruff", *args, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_no_tracked_config_or_script_line_over_100_columns() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "*.yaml", "*.toml", "*.sh"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout.split()
    if not tracked:
        pytest.fail("git ls-files listed no yaml/toml/sh file: is this a git checkout?")
    long = [
        f"{name}:{number}"
        for name in tracked
        for number, line in enumerate((ROOT / name).read_text().splitlines(), 1)
        if len(line) > 100
    ]
    assert not long, long
