"""Fixtures every test shares, and the thread budget of a parallel test run."""

from __future__ import annotations

import os
import sys

import pytest


def _threads_per_worker() -> int | None:
    """Under pytest-xdist (``-n``, the default from pyproject.toml), the cores divided among
    the workers (at least 1); ``None`` in a plain run. Without this every worker's torch (and
    every ``lorae`` child it starts) takes all cores, and two workers on 2 cores run slower
    than one."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return None
    from lorae.data.base import available_cores

    return max(1, available_cores() // int(workers))


def pytest_configure(config: pytest.Config) -> None:
    threads = _threads_per_worker()
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by child processes
        import torch

        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test with ``sys.argv == ["lorae"]``: LightningCLI reads ``sys.argv`` when it
    is given no ``args`` and warns when both are set, and pytest's own arguments must never
    reach it."""
    monkeypatch.setattr(sys, "argv", ["lorae"])
