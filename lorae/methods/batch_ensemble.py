"""BatchEnsemble on the attention projections (paper appendix I.1) and BatchEnsemble++ (I.2).

Initialisation follows appendix I.1: "The r and s vectors are initialized from a Gaussian
distribution centered around 1, specifically r, s ~ N(1, σ²), where σ² controls the variance.
We empirically set σ² = 0.02." and I.2 for BatchEnsemble++: "the r and s vectors are also
initialized from a Gaussian distribution but centered around 0". ``init_variance`` is that σ²
(standard deviation ``sqrt(0.02) ≈ 0.141``), the same for both variants.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorae.backbones.base import Inputs, Pretrained
from lorae.errors import ConfigError
from lorae.heads import EnsembleHead
from lorae.lora import ATTENTION, attention_parts, replace_projections
from lorae.methods.base import BackboneMethod, repeat_members
from lorae.methods.registry import register_method

Variant = Literal["multiplicative", "additive"]


class BatchEnsembleLinear(nn.Module):
    """A shared trainable projection ``W`` with rank-1 member factors ``r_i``, ``s_i``.

    ``"multiplicative"`` (BatchEnsemble, Wen et al. 2020; paper appendix I.1):
    ``W_i = W ∘ (r_i s_iᵀ)``, i.e. ``y = ((x ∘ s_i) Wᵀ) ∘ r_i + b``, with ``r, s ~ N(1, σ²)``.
    ``"additive"`` (BatchEnsemble++, appendix I.2): ``W_i = W + r_i s_iᵀ``, i.e.
    ``y = x Wᵀ + b + (x · s_i) r_i``, with ``r, s ~ N(0, σ²)``. A fused q/k/v projection gets
    one ``(r, s)`` pair per part, exactly as three separate linears would.

    Args:
        base: the pretrained projection; its weight and bias become the shared trainable ``W``.
        parts: how many equal output parts ``base`` fuses (3 for a fused qkv, else 1).
        num_members: M.
        variant: ``"multiplicative"`` or ``"additive"``.
        init_variance: σ², the variance of the factors' Gaussian initialisation (not its
            standard deviation).

    Shape:
        - r: ``(M, P, D_part)``, s: ``(M, P, D_in)``
        - input ``(M*B, ..., D_in)`` member-major, output ``(M*B, ..., P*D_part)``
    """

    def __init__(
        self, base: nn.Linear, parts: int, num_members: int, variant: Variant, init_variance: float
    ) -> None:
        super().__init__()
        if variant not in ("multiplicative", "additive"):
            raise ConfigError(f"variant must be 'multiplicative' or 'additive', got {variant!r}.")
        if init_variance < 0:
            raise ConfigError(f"init_variance must be >= 0, got {init_variance}.")
        std = math.sqrt(init_variance)
        self.base = base.requires_grad_(True)
        self.variant = variant
        self.parts = parts
        weight = base.weight
        part_dim = base.out_features // parts
        mean = 1.0 if variant == "multiplicative" else 0.0
        self.r = nn.Parameter(weight.new_empty(num_members, parts, part_dim).normal_(mean, std))
        self.s = nn.Parameter(
            weight.new_empty(num_members, parts, base.in_features).normal_(mean, std)
        )

    @property
    def num_members(self) -> int:
        return int(self.r.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        m, p = self.num_members, self.parts
        xm = x.reshape(m, -1, x.shape[-1])  # (M, N, D_in)
        r, s = self.r.to(xm.dtype), self.s.to(xm.dtype)
        weight = self.base.weight
        if self.variant == "multiplicative":
            scaled = xm.unsqueeze(2) * s.unsqueeze(1)  # (M, N, P, D_in)
            out = torch.einsum("mnpi,poi->mnpo", scaled, weight.view(p, -1, weight.shape[-1]))
            out = out * r.unsqueeze(1)
            if self.base.bias is not None:
                out = out + self.base.bias.view(p, -1)
        else:
            out = F.linear(xm, weight, self.base.bias).view(m, xm.shape[1], p, -1)
            coefficient = torch.einsum("mni,mpi->mnp", xm, s)  # (M, N, P)
            out = out + coefficient.unsqueeze(-1) * r.unsqueeze(1)
        return out.reshape(*x.shape[:-1], -1)

    def member_weight(self) -> Tensor:
        """Every member's effective weight ``W_i``. Shape: ``(M, P*D_part, D_in)``."""
        m, p = self.num_members, self.parts
        weight = self.base.weight.view(1, p, -1, self.base.in_features)
        outer = self.r.unsqueeze(-1) * self.s.unsqueeze(-2)  # (M, P, D_part, D_in)
        effective = weight * outer if self.variant == "multiplicative" else weight + outer
        return effective.reshape(m, -1, self.base.in_features)


@register_method("batch_ensemble")
class BatchEnsemble(BackboneMethod):
    """BatchEnsemble (``variant: multiplicative``) or BatchEnsemble++ (``variant: additive``)
    on every attention projection q, k, v, o; one classifier head per member.

    The shared projections (initialised from the pretrained weights), the member factors and
    the heads train; the rest of the backbone stays frozen. Members run batched: the input is
    repeated member-major and every layer applies all members' factors at once.

    Args:
        num_classes: C (linked from the data module by the CLI).
        backbone: a registered backbone name.
        num_members: M.
        variant: ``"multiplicative"`` (appendix I.1) or ``"additive"`` (appendix I.2).
        init_variance: σ², the variance of ``r`` and ``s`` at initialisation: ``N(1, σ²)``
            for the multiplicative variant, ``N(0, σ²)`` for the additive one (appendix I.1:
            "We empirically set σ² = 0.02", i.e. a standard deviation of about 0.141).
        pretrained: ``True`` (download), ``False`` (random) or a local weights path.
        backbone_overrides: architecture arguments for the backbone constructor.

    Shape:
        inputs ``(B, ...)`` -> logits ``(M, B, C)``
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str,
        num_members: int = 16,
        variant: Variant = "multiplicative",
        init_variance: float = 0.02,
        pretrained: Pretrained = True,
        backbone_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(num_classes, backbone, num_members, pretrained, backbone_overrides)
        self.variant = variant
        self.backbone.requires_grad_(False)

        def build(base: nn.Linear, keys: tuple[str, ...], enabled: list[str]) -> nn.Module:
            return BatchEnsembleLinear(base, len(keys), num_members, variant, init_variance)

        replace_projections(self.backbone.model, self.backbone.family, build, ATTENTION)
        self.head = EnsembleHead(num_members, self.backbone.feature_dim, num_classes)

    def forward(self, x: Inputs) -> Tensor:
        return self.head(self.backbone(repeat_members(x, self.num_members)))

    @torch.no_grad()
    def member_weights(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Reference: the shared weight ``W`` (trained, initialised from the pretrained one);
        members: the effective ``W_i`` of the variant's formula.

        Shape:
            ``{"<block>.<q|k|v|o>": ((D_out, D_in), (M, D_out, D_in))}``
        """
        weights: dict[str, tuple[Tensor, Tensor]] = {}
        model, family = self.backbone.model, self.backbone.family
        for key, _, layer, rows in attention_parts(model, family, BatchEnsembleLinear):
            assert isinstance(layer, BatchEnsembleLinear)
            weights[key] = (layer.base.weight[rows].clone(), layer.member_weight()[:, rows])
        return weights

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "variant": self.variant}
