"""Ensemble methods: each returns member logits ``(M, B, C)``.

Every file of this folder is imported here, so a method registers itself
(:func:`~lorae.methods.registry.register_method`) just by living in a file of its own, and its
class is available as ``lorae.methods.<Class>`` (the ``class_path`` in configs). The explicit
imports below are the typed public API of the built-in methods; the list of methods is
:data:`~lorae.methods.registry.METHODS`.
"""

import importlib
import pkgutil

from lorae.methods.base import BackboneMethod, EnsembleMethod, repeat_members
from lorae.methods.batch_ensemble import BatchEnsemble, BatchEnsembleLinear
from lorae.methods.bayes_lora import BayesLoRA, kfac_factors, kron_sample
from lorae.methods.explicit import ExplicitEnsemble
from lorae.methods.film import FiLMEnsemble, MemberLayerNorm
from lorae.methods.lora_ensemble import LoRAEnsemble, LoRANetworkMethod
from lorae.methods.mc_dropout import MCDropout
from lorae.methods.registry import METHODS, class_path, method_class, register_method
from lorae.methods.single import SingleNetwork
from lorae.methods.snapshot import SnapshotEnsemble, snapshot_epochs, snapshot_schedule

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # registers the file's method(s)
for _cls in METHODS.values():
    globals().setdefault(_cls.__name__, _cls)

__all__ = [
    "METHODS",
    "BackboneMethod",
    "BatchEnsemble",
    "BatchEnsembleLinear",
    "BayesLoRA",
    "EnsembleMethod",
    "ExplicitEnsemble",
    "FiLMEnsemble",
    "LoRAEnsemble",
    "LoRANetworkMethod",
    "MCDropout",
    "MemberLayerNorm",
    "SingleNetwork",
    "SnapshotEnsemble",
    "class_path",
    "kfac_factors",
    "kron_sample",
    "method_class",
    "register_method",
    "repeat_members",
    "snapshot_epochs",
    "snapshot_schedule",
]
