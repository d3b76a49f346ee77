"""The ``lorae`` command: Lightning's ``fit``/``validate``/``test``/``predict`` (:mod:`.main`)
and lorae's tools (``analyze``, ``aggregate``, ``crossval``, ``export``: one module each, listed
in :mod:`.tools`), which reuse the one :func:`~lorae.cli.main.build_cli`."""

from lorae.cli.main import LoraeCLI, build_cli, main

__all__ = ["LoraeCLI", "build_cli", "main"]
