"""LoRA-Ensemble (paper section 3): one frozen backbone, M LoRA adapters, M heads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lorae.backbones import create_backbone
from lorae.backbones.base import Inputs, Pretrained
from lorae.heads import HeadKind, make_head
from lorae.lora import (
    ATTENTION,
    BackboneTraining,
    LoRAEnsembleFusedLinear,
    LoRAEnsembleLinear,
    LoRAInit,
    Projection,
    attention_parts,
    inject_lora,
    train_backbone_weights,
)
from lorae.methods.base import EnsembleMethod, repeat_members


class LoRAEnsemble(EnsembleMethod):
    """Implicit ensemble: member i uses ``W + (alpha/R) B_i A_i`` on every adapted projection
    (paper Eq. 3) and its own classifier head; the pretrained weights are frozen and shared.

    All members run in one batched forward pass: the input is repeated member-major and each
    LoRA layer adds all members' deltas with one batched matmul. ``num_members=1`` is the
    paper's "single network with LoRA" baseline (with ``rank: 128`` its high-rank variant,
    Tab. 7); no separate code path.

    The variants the paper studies are options, not classes: ``targets`` with ``mlp`` (LoRA
    on the MLP too), ``last_blocks`` (LoRA only in the last k blocks), ``train_backbone``
    (``"embedding"``: trainable patch embedding / "tokenizer"; ``"all"``: fully trainable
    backbone, appendix F), ``head`` (per-member versus shared head, Tab. 13) and ``init``
    (Xavier-uniform with gain g or Gaussian with std s, appendix N, Tab. 18).

    Args:
        num_classes: C (linked from the data module by the CLI).
        backbone: a registered backbone name (:func:`lorae.backbones.known_backbones`).
        num_members: ensemble size M (paper: 16 for CIFAR/HAM10000, 8 for SST-2).
        rank: LoRA rank R (paper: 8 for ViT, 64 for BERT).
        alpha: LoRA scale numerator; ``None`` is ``alpha = rank`` (scale 1, as the paper).
        targets: projections that get LoRA: ``q``, ``k``, ``v``, ``o`` (default) and ``mlp``.
        last_blocks: adapt only the last k transformer blocks (``None``: all).
        init: ``A`` init, ``"xavier_uniform"`` (gain ``init_gain``, paper default 10) or
            ``"normal"`` (std ``init_std``) (paper appendix N).
        init_gain: Xavier-uniform gain.
        init_std: Gaussian standard deviation.
        train_backbone: pretrained weights that train too, shared by all members.
        head: ``"member"`` (one head per member, default) or ``"shared"``.
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
        rank: int = 8,
        alpha: float | None = None,
        targets: Sequence[Projection] = ATTENTION,
        last_blocks: int | None = None,
        init: LoRAInit = "xavier_uniform",
        init_gain: float = 10.0,
        init_std: float = 0.02,
        train_backbone: BackboneTraining = "none",
        head: HeadKind = "member",
        pretrained: Pretrained = True,
        backbone_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_members = num_members
        self.rank = rank
        self.backbone_name = backbone
        self.backbone = create_backbone(backbone, pretrained, backbone_overrides)
        self.lora_modules = inject_lora(
            self.backbone.model,
            self.backbone.family,
            num_members=num_members,
            rank=rank,
            targets=tuple(targets),
            last_blocks=last_blocks,
            alpha=alpha,
            init=init,
            init_gain=init_gain,
            init_std=init_std,
        )
        train_backbone_weights(self.backbone.model, self.backbone.family, train_backbone)
        self.head = make_head(head, num_members, self.backbone.feature_dim, num_classes)

    def forward(self, x: Inputs) -> Tensor:
        features = self.backbone(repeat_members(x, self.num_members))  # (M*B, D)
        return self.head(features)  # (M, B, C)

    @torch.no_grad()
    def member_weights(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Reference: the frozen pretrained projection ``W_0`` (a third of a fused qkv);
        members: ``W_0 + (alpha/R) B_i A_i`` (paper Eq. 3), for every adapted q, k, v, o.

        With ``train_backbone`` other than ``"none"`` the shared weight has moved too; the
        reference is then its current (shared, trained) value.

        Shape:
            ``{"<block>.<q|k|v|o>": ((D_out, D_in), (M, D_out, D_in))}``
        """
        weights: dict[str, tuple[Tensor, Tensor]] = {}
        deltas: dict[int, Tensor] = {}
        model, family = self.backbone.model, self.backbone.family
        for key, projection, layer, rows in attention_parts(model, family, LoRAEnsembleLinear):
            assert isinstance(layer, LoRAEnsembleLinear)
            if isinstance(layer, LoRAEnsembleFusedLinear) and projection not in layer.enabled:
                continue
            if id(layer) not in deltas:
                deltas[id(layer)] = layer.delta_weight()
            reference = layer.base.weight[rows]
            weights[key] = (reference.clone(), reference + deltas[id(layer)][:, rows])
        return weights

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "backbone": self.backbone_name, "rank": self.rank}


class LoRANetworkMethod(EnsembleMethod):
    """Base of methods whose members all derive from one one-member LoRA network,
    ``self.network`` (Snapshot Ensemble, Bayes-LoRA): they share its identity."""

    network: LoRAEnsemble

    def identity(self) -> dict[str, Any]:
        network = self.network.identity()
        return {**super().identity(), "backbone": network["backbone"], "rank": network["rank"]}
