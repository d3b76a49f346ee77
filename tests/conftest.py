"""Fixtures every test shares."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test with ``sys.argv == ["lorae"]``: LightningCLI reads ``sys.argv`` when it
    is given no ``args`` and warns when both are set, and pytest's own arguments must never
    reach it."""
    monkeypatch.setattr(sys, "argv", ["lorae"])
