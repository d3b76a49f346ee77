"""LoRA-Ensemble engine: batched low-rank layers, the MHA replacement, injection, targets."""

from lorae.lora.inject import (
    BackboneTraining,
    attention_parts,
    family_targets,
    inject_lora,
    lora_layers,
    replace_projections,
    train_backbone_weights,
)
from lorae.lora.layers import LoRAEnsembleFusedLinear, LoRAEnsembleLinear, LoRAInit, lora_scale
from lorae.lora.mha import MultiheadSelfAttention, replace_multihead_attention
from lorae.lora.targets import ATTENTION, TARGETS, BackboneFamily, FamilyTargets, Projection

__all__ = [
    "ATTENTION",
    "TARGETS",
    "BackboneFamily",
    "BackboneTraining",
    "FamilyTargets",
    "LoRAEnsembleFusedLinear",
    "LoRAEnsembleLinear",
    "LoRAInit",
    "MultiheadSelfAttention",
    "Projection",
    "attention_parts",
    "family_targets",
    "inject_lora",
    "lora_layers",
    "lora_scale",
    "replace_multihead_attention",
    "replace_projections",
    "train_backbone_weights",
]
