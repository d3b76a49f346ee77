"""lorae: LoRA-Ensemble, an implicit ensemble of low-rank adapters on one frozen transformer.

Entry points: the ``lorae`` command (:mod:`lorae.cli`), the methods (:mod:`lorae.methods`),
the LoRA engine (:mod:`lorae.lora`) and the ensemble metrics (:mod:`lorae.metrics`).
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lorae")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["Predictor", "__version__"]


def __getattr__(name: str) -> object:
    """``lorae.Predictor`` is imported on first use, so ``import lorae`` stays light."""
    if name == "Predictor":  # by name: the package root must not import the top layer
        return importlib.import_module("lorae.predictor").Predictor
    raise AttributeError(f"module 'lorae' has no attribute {name!r}")
