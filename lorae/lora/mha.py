"""A drop-in replacement for ``torch.nn.MultiheadAttention`` (self-attention only).

torchvision's ViT calls ``nn.MultiheadAttention``, whose fused input projection is applied
with ``F.multi_head_attention_forward`` and never goes through an ``nn.Linear``, so LoRA has
nothing to wrap. :class:`MultiheadSelfAttention` holds the *same* parameters (not copies) as
two ordinary linear layers, ``qkv`` (``D -> 3D``, fused like timm's ``attn.qkv``) and
``proj`` (``D -> D``), and computes the same function with
``F.scaled_dot_product_attention``. LoRA then injects into it exactly as into a timm ViT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiheadSelfAttention(nn.Module):
    """Self-attention with a fused ``qkv`` projection; same call signature as
    ``nn.MultiheadAttention`` for ``query is key is value``.

    Args:
        embed_dim: model width D.
        num_heads: number of heads H (``D % H == 0``).
        dropout: attention-probability dropout, active in training mode only.
        bias: whether the projections have biases.
        batch_first: input layout, as in ``nn.MultiheadAttention``.

    Shape:
        - query: ``(N, T, D)`` if ``batch_first`` else ``(T, N, D)``
        - key_padding_mask: ``(N, T)`` bool (True = ignore that key) or float (added)
        - attn_mask: ``(T, T)`` or ``(N*H, T, T)`` bool (True = not allowed) or float (added)
        - output: ``(attn_output, None)`` with ``attn_output`` shaped like ``query``
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}.")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> MultiheadSelfAttention:
        """Build from an ``nn.MultiheadAttention``, sharing its parameter tensors."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "Only plain self-attention nn.MultiheadAttention (kdim = vdim = embed_dim, no "
                "bias_k/bias_v, no add_zero_attn) can be converted for LoRA."
            )
        has_bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, has_bias, mha.batch_first)
        new.qkv.weight = mha.in_proj_weight
        new.proj.weight = mha.out_proj.weight
        if has_bias:
            new.qkv.bias = mha.in_proj_bias
            new.proj.bias = mha.out_proj.bias
        return new.to(mha.in_proj_weight.device)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        del average_attn_weights  # only meaningful when weights are returned, which we refuse
        if not (query is key and key is value):
            raise NotImplementedError("MultiheadSelfAttention supports self-attention only.")
        if need_weights:
            # torchvision's ViT passes need_weights=False; attention maps would need the
            # unfused softmax path, which this replacement deliberately does not keep.
            raise NotImplementedError("MultiheadSelfAttention does not return attention weights.")
        x = query if self.batch_first else query.transpose(0, 1)
        n, t, d = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        mask = _merge_masks(attn_mask, key_padding_mask, n, h, t, q.dtype)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
        )
        out = self.proj(out.transpose(1, 2).reshape(n, t, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """nn.MultiheadAttention masks: bool True = masked out, float = added to the scores."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _merge_masks(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    n: int,
    h: int,
    t: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """Combine both masks into one additive mask broadcastable to ``(N, H, T, T)``."""
    merged: Tensor | None = None
    if attn_mask is not None:
        merged = _as_additive(attn_mask, dtype)
        if merged.dim() == 3:
            merged = merged.view(n, h, t, t)
    if key_padding_mask is not None:
        padding = _as_additive(key_padding_mask, dtype).view(n, 1, 1, t)
        merged = padding if merged is None else merged + padding
    return merged


def replace_multihead_attention(model: nn.Module) -> list[str]:
    """Swap every ``nn.MultiheadAttention`` in ``model`` for :class:`MultiheadSelfAttention`.

    Returns:
        The qualified names of the replaced modules.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, MultiheadSelfAttention.from_module(getattr(parent, child)))
    return names
