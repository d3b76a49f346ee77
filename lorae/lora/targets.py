"""Where LoRA goes in each backbone family: a table, not code (paper section 3, appendix F).

Each entry maps a projection key to a regular expression that must *fully* match a module's
qualified name inside the backbone model; group 1 of every pattern is the transformer-block
index, which "LoRA only in the last k blocks" filters on. Keys:

- ``q``, ``k``, ``v``, ``o``: the attention projections W_q, W_k, W_v, W_o (the paper's
  default placement);
- ``mlp``: both linear layers of the feed-forward block (the paper's "+ MLP" variant).

Families whose q, k and v live in one fused linear layer name that layer in ``fused_qkv``;
LoRA then adds separate q/k/v deltas on its thirds. ``prepare`` rewrites modules LoRA cannot
reach otherwise (torchvision's ``nn.MultiheadAttention``) before injection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from lorae.lora.mha import replace_multihead_attention

Projection = Literal["q", "k", "v", "o", "mlp"]
ATTENTION: tuple[Projection, ...] = ("q", "k", "v", "o")
QKV: tuple[str, ...] = ("q", "k", "v")


@dataclass(frozen=True)
class FamilyTargets:
    """LoRA target patterns of one backbone family.

    Attributes:
        linear: projection key -> full-match regex of the ``nn.Linear`` modules it names.
        fused_qkv: full-match regex of fused ``D -> 3D`` q/k/v linears, or ``None``.
        embedding: full-match regex of the input embedding module (patch embedding /
            "tokenizer", or the token embeddings), which some variants train.
        block: regex matching the start of every parameter name inside transformer block k
            (group 1 is k), for per-block options such as weight noise on the last blocks.
        block_module: full-match regex of the transformer block modules themselves (group 1
            is k): where a shared trunk fans out to the members (:mod:`lorae.lora.trunk`).
        prepare: optional in-place rewrite run before matching (returns what it replaced).
    """

    linear: Mapping[str, str]
    embedding: str
    block: str
    block_module: str
    fused_qkv: str | None = None
    prepare: Callable[[nn.Module], list[str]] | None = field(default=None, compare=False)


#: Keyed by family name; the names are the values of ``lorae.backbones.base.BackboneFamily``
#: (the backbone owns its family; this table only says where LoRA goes in each, and a test
#: keeps the two in step without lorae.lora importing lorae.backbones).
TARGETS: dict[str, FamilyTargets] = {
    "timm_vit": FamilyTargets(
        fused_qkv=r"blocks\.(\d+)\.attn\.qkv",
        embedding=r"patch_embed",
        block=r"blocks\.(\d+)\.",
        block_module=r"blocks\.(\d+)",
        linear={"o": r"blocks\.(\d+)\.attn\.proj", "mlp": r"blocks\.(\d+)\.mlp\.fc[12]"},
    ),
    "torchvision_vit": FamilyTargets(
        fused_qkv=r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.qkv",
        embedding=r"conv_proj",
        block=r"encoder\.layers\.encoder_layer_(\d+)\.",
        block_module=r"encoder\.layers\.encoder_layer_(\d+)",
        linear={
            "o": r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.proj",
            "mlp": r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.[03]",
        },
        prepare=replace_multihead_attention,
    ),
    "hf_bert": FamilyTargets(
        embedding=r"embeddings",
        block=r"encoder\.layer\.(\d+)\.",
        block_module=r"encoder\.layer\.(\d+)",
        linear={
            "q": r"encoder\.layer\.(\d+)\.attention\.self\.query",
            "k": r"encoder\.layer\.(\d+)\.attention\.self\.key",
            "v": r"encoder\.layer\.(\d+)\.attention\.self\.value",
            "o": r"encoder\.layer\.(\d+)\.attention\.output\.dense",
            "mlp": r"encoder\.layer\.(\d+)\.(?:intermediate|output)\.dense",
        },
    ),
}
