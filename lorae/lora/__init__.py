"""LoRA-Ensemble engine: the options (:class:`LoRASpec`), batched low-rank layers, the MHA
replacement, injection, targets, member chunks and the shared trunk."""

from lorae.lora.chunks import (
    DEFAULT_ROW_BUDGET,
    ROW_BUDGET,
    MemberChunkSize,
    auto_chunk_size,
    member_chunks,
    member_factors,
)
from lorae.lora.config import LoRAInit, LoRASpec
from lorae.lora.inject import (
    BackboneTraining,
    attention_parts,
    family_targets,
    inject_lora,
    lora_layers,
    replace_projections,
    train_backbone_weights,
)
from lorae.lora.layers import LoRAEnsembleFusedLinear, LoRAEnsembleLinear
from lorae.lora.mha import MultiheadSelfAttention, replace_multihead_attention
from lorae.lora.targets import ATTENTION, TARGETS, FamilyTargets, Projection
from lorae.lora.trunk import SharedTrunk, transformer_blocks

__all__ = [
    "ATTENTION",
    "DEFAULT_ROW_BUDGET",
    "ROW_BUDGET",
    "TARGETS",
    "BackboneTraining",
    "FamilyTargets",
    "LoRAEnsembleFusedLinear",
    "LoRAEnsembleLinear",
    "LoRAInit",
    "LoRASpec",
    "MemberChunkSize",
    "MultiheadSelfAttention",
    "Projection",
    "SharedTrunk",
    "attention_parts",
    "auto_chunk_size",
    "family_targets",
    "inject_lora",
    "lora_layers",
    "member_chunks",
    "member_factors",
    "replace_multihead_attention",
    "replace_projections",
    "train_backbone_weights",
    "transformer_blocks",
]
