"""Ensemble methods: each returns member logits ``(M, B, C)``."""

from lorae.methods.base import EnsembleMethod, repeat_members
from lorae.methods.batch_ensemble import BatchEnsemble, BatchEnsembleLinear
from lorae.methods.bayes_lora import BayesLoRA, kfac_factors, kron_sample
from lorae.methods.explicit import ExplicitEnsemble
from lorae.methods.film import FiLMEnsemble, MemberLayerNorm
from lorae.methods.lora_ensemble import LoRAEnsemble
from lorae.methods.mc_dropout import MCDropout
from lorae.methods.single import SingleNetwork
from lorae.methods.snapshot import SnapshotEnsemble, snapshot_epochs, snapshot_schedule

__all__ = [
    "BatchEnsemble",
    "BatchEnsembleLinear",
    "BayesLoRA",
    "EnsembleMethod",
    "ExplicitEnsemble",
    "FiLMEnsemble",
    "LoRAEnsemble",
    "MCDropout",
    "MemberLayerNorm",
    "SingleNetwork",
    "SnapshotEnsemble",
    "kfac_factors",
    "kron_sample",
    "repeat_members",
    "snapshot_epochs",
    "snapshot_schedule",
]
