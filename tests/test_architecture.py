"""The layering of docs/architecture.md holds: import-linter's contracts in .importlinter."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    executable = shutil.which("lint-imports")
    if executable is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [executable, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_every_layer_has_a_contract_and_all_are_kept() -> None:
    output = _lint_imports()
    assert "0 broken" in output
    contracts = (ROOT / ".importlinter").read_text()
    packages = sorted(
        p.name for p in (ROOT / "lorae").iterdir() if p.is_dir() and (p / "__init__.py").exists()
    )
    modules = sorted(p.stem for p in (ROOT / "lorae").glob("*.py") if not p.stem.startswith("_"))
    for name in [*packages, *modules]:
        assert f"lorae.{name}" in contracts, f"lorae.{name} is in no import-linter contract"
