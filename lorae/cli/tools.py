"""Subcommands of ``lorae`` beyond Lightning's ``fit``/``validate``/``test``/``predict``.

Each entry maps a subcommand name to ``"module:function"``; the function takes the remaining
command-line arguments (``list[str]``) and returns an exit code. Modules are imported only
when their subcommand runs, so ``lorae --help`` stays fast and optional extras stay optional.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

TOOLS: dict[str, tuple[str, str]] = {
    # name: ("module:function", one-line help shown by `lorae --help`)
    "analyze": (
        "lorae.cli.analyze:main",
        "diversity and weight-space analysis (numbers and plots) of a checkpoint",
    ),
    "aggregate": (
        "lorae.cli.aggregate:main",
        "collect metrics.json of several runs into a mean ± std table (Markdown, CSV)",
    ),
    "calibrate": (
        "lorae.cli.calibrate:main",
        "fit a temperature and a guaranteed abstention threshold; write a calibrated checkpoint",
    ),
    "crossval": (
        "lorae.cli.crossval:main",
        "train every fold (ESC-50) and evaluate the pooled held-out predictions",
    ),
    "export": (
        "lorae.cli.export:main",
        "write a checkpoint's adapters (not the frozen backbone) to one .safetensors file",
    ),
}


def resolve(name: str) -> Callable[[list[str]], int]:
    """The entry function of tool ``name`` (a key of :data:`TOOLS`)."""
    module_name, function_name = TOOLS[name][0].split(":")
    function: Callable[[list[str]], int] = getattr(
        importlib.import_module(module_name), function_name
    )
    return function


def describe() -> str:
    """One line per tool for the top-level help text."""
    return "\n".join(f"  {name:<12} {summary}" for name, (_, summary) in sorted(TOOLS.items()))
