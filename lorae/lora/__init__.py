"""LoRA-Ensemble engine: batched low-rank layers, the MHA replacement, injection, targets."""

from lorae.lora.inject import inject_lora, lora_layers
from lorae.lora.layers import LoRAEnsembleFusedLinear, LoRAEnsembleLinear, LoRAInit, lora_scale
from lorae.lora.mha import MultiheadSelfAttention, replace_multihead_attention
from lorae.lora.targets import ATTENTION, TARGETS, BackboneFamily, FamilyTargets, Projection

__all__ = [
    "ATTENTION",
    "TARGETS",
    "BackboneFamily",
    "FamilyTargets",
    "LoRAEnsembleFusedLinear",
    "LoRAEnsembleLinear",
    "LoRAInit",
    "MultiheadSelfAttention",
    "Projection",
    "inject_lora",
    "lora_layers",
    "lora_scale",
    "replace_multihead_attention",
]
