"""The Dockerfile cannot be built here (no Docker engine): parse it, lint it, and keep it in
step with pyproject.toml."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (pytest and mypy depend on tomli there)
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, comments dropped, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def arguments(keyword: str) -> list[str]:
    return [rest for kw, rest in instructions() if kw == keyword]


def test_base_image_is_a_pytorch_runtime() -> None:
    (base,) = arguments("FROM")
    image, _, tag = base.partition(":")
    assert image == "pytorch/pytorch"
    assert tag.endswith("-runtime"), tag


def test_base_image_torch_satisfies_pyproject() -> None:
    (base,) = arguments("FROM")
    torch_version = tuple(int(x) for x in base.split(":")[1].split("-")[0].split("."))
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    (spec,) = [d for d in dependencies if re.match(r"torch\b(?!vision|audio|metrics)", d)]
    minimum = tuple(int(x) for x in spec.split(">=")[1].split(",")[0].split("."))
    assert torch_version >= minimum, (torch_version, spec)


def test_runs_as_non_root_user() -> None:
    users = arguments("USER")
    assert users, "no USER instruction: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_entrypoint_is_the_lorae_command() -> None:
    (entrypoint,) = arguments("ENTRYPOINT")
    assert json.loads(entrypoint) == ["lorae"]


def test_installs_the_package_non_editable_with_existing_extras() -> None:
    installs = [run for run in arguments("RUN") if "pip install" in run]
    assert len(installs) == 1, installs
    assert " -e " not in f" {installs[0]} " and "--editable" not in installs[0]
    found = re.search(r"\"\.\[([a-z,\-]+)\]\"", installs[0])
    assert found, f'expected pip install ".[extras]" in {installs[0]!r}'
    extras = set(found.group(1).split(","))
    declared = set(
        tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
            "optional-dependencies"
        ]
    )
    assert extras <= declared, f"extras {extras - declared} are not in pyproject.toml"


def test_package_sources_are_copied_and_not_ignored() -> None:
    copied = " ".join(arguments("COPY"))
    for needed in ("pyproject.toml", "README.md", "lorae"):  # what `pip install .` reads
        assert needed in copied
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert not {"lorae", "pyproject.toml", "README.md", "configs"} & set(ignored)


def test_data_and_runs_are_volumes() -> None:
    (volumes,) = arguments("VOLUME")
    assert set(json.loads(volumes)) == {"/data", "/runs"}


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_hadolint_passes() -> None:
    result = subprocess.run(
        ["hadolint", "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
