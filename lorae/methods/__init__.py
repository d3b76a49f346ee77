"""Ensemble methods: each returns member logits ``(M, B, C)``."""

from lorae.methods.base import EnsembleMethod, repeat_members
from lorae.methods.lora_ensemble import LoRAEnsemble
from lorae.methods.single import SingleNetwork

__all__ = ["EnsembleMethod", "LoRAEnsemble", "SingleNetwork", "repeat_members"]
