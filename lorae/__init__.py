"""lorae: LoRA-Ensemble, an implicit ensemble of low-rank adapters on one frozen transformer.

Entry points: the ``lorae`` command (:mod:`lorae.cli`), the methods (:mod:`lorae.methods`),
the LoRA engine (:mod:`lorae.lora`) and the ensemble metrics (:mod:`lorae.metrics`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lorae")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
