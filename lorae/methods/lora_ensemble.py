"""LoRA-Ensemble (paper section 3): one frozen backbone, M LoRA adapters, M heads."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from lorae.backbones.base import Inputs, Pretrained
from lorae.errors import ConfigError
from lorae.heads import HeadKind, make_head
from lorae.lora import (
    BackboneTraining,
    LoRAEnsembleFusedLinear,
    LoRAEnsembleLinear,
    LoRASpec,
    attention_parts,
    inject_lora,
    lora_layers,
    train_backbone_weights,
)
from lorae.lora.chunks import MemberChunkSize, check_chunk_size, member_chunks, member_factors
from lorae.lora.trunk import SharedTrunk, first_block
from lorae.methods.base import BackboneMethod, EnsembleMethod, repeat_members
from lorae.methods.registry import register_method

#: The paper's LoRA settings for ViT (rank 8 on q, k, v, o, Xavier-uniform gain 10).
DEFAULT_LORA = LoRASpec()


@register_method("lora_ensemble")
class LoRAEnsemble(BackboneMethod):
    """Implicit ensemble: member i uses ``W + (alpha/R) B_i A_i`` on every adapted projection
    (paper Eq. 3) and its own classifier head; the pretrained weights are frozen and shared.

    Members run batched: the input is repeated member-major and each LoRA layer adds all
    members' deltas with one batched matmul (all members in one pass, or chunks of them).
    ``num_members=1`` is the paper's "single network with LoRA" baseline (with ``rank: 128``
    its high-rank variant, Tab. 7); no separate code path.

    Execution options that never change the results (up to float rounding): members can run
    in chunks through the whole backbone (``member_chunk_size``, :mod:`lorae.lora.chunks`);
    with ``last_blocks`` the blocks before the first adapted one run once on the B samples
    and fan out to the members there (a shared trunk, :mod:`lorae.lora.trunk`; in training
    the trunk's dropout masks are then shared by the members); ``compile`` compiles the
    backbone network with ``torch.compile`` (parameter names and checkpoints unchanged).

    ``lora.last_blocks: 0`` is lorae's own extension, not a row of the paper's Tab. 13: the
    head-only ensemble, no adapters at all, the backbone runs once on the B samples and the M
    per-member heads are the only member-specific (trainable) part. Every row of Tab. 13
    keeps LoRA on attention; its parameter counts fix the reading ("Cls. head" = ``head:
    shared``, 2,364,679 trainable for M = 8, rank 4, 7 classes; "Ensemble cls. head" = the
    default per-member heads, 2,402,360; ``configs/ham10000/tab13_*.yaml``).

    The variants the paper studies are options, not classes: ``lora.targets`` with ``mlp``
    (LoRA on the MLP too), ``lora.last_blocks`` (LoRA only in the last k blocks),
    ``train_backbone`` (``"embedding"``: trainable patch embedding / "tokenizer"; ``"all"``:
    fully trainable backbone, appendix F), ``head`` (per-member versus shared head, Tab. 13)
    and ``lora.init`` (Xavier-uniform with gain g or Gaussian with std s, appendix N, Tab. 18).

    Args:
        num_classes: C (linked from the data module by the CLI).
        backbone: a registered backbone name (:func:`lorae.backbones.known_backbones`).
        num_members: ensemble size M (paper: 16 for CIFAR/HAM10000, 8 for SST-2).
        lora: rank, scale, targets, last blocks and init (:class:`~lorae.lora.LoRASpec`;
            paper: rank 8 for ViT, 64 for BERT). ``last_blocks: 0`` (no adapters, the
            head-only ensemble) needs ``head: member``.
        train_backbone: pretrained weights that train too, shared by all members.
        head: ``"member"`` (one head per member, default) or ``"shared"``.
        pretrained: ``True`` (download), ``False`` (random) or a local weights path.
        backbone_overrides: architecture arguments for the backbone constructor.
        member_chunk_size: members per forward chunk: ``None`` (all in one batch of M*B
            rows), an int k, or ``"auto"`` (k*B near the device's row budget,
            :data:`lorae.lora.chunks.ROW_BUDGET`).
        compile: compile the backbone network with ``torch.compile`` (not the head); member
            chunks of equal size share one compiled graph.

    Shape:
        inputs ``(B, ...)`` -> logits ``(M, B, C)``
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str,
        num_members: int = 16,
        lora: LoRASpec = DEFAULT_LORA,
        train_backbone: BackboneTraining = "none",
        head: HeadKind = "member",
        pretrained: Pretrained = True,
        backbone_overrides: Mapping[str, Any] | None = None,
        member_chunk_size: MemberChunkSize = "auto",
        compile: bool = False,
    ) -> None:
        check_chunk_size(member_chunk_size)
        last_blocks = lora.last_blocks
        if last_blocks == 0 and head == "shared":
            raise ConfigError(
                "lora.last_blocks: 0 (no adapters) with head: shared would make all members "
                "the same network; use head: member (the head-only ensemble) or "
                "lora.last_blocks >= 1."
            )
        super().__init__(num_classes, backbone, num_members, pretrained, backbone_overrides)
        self.lora = lora
        self.rank = lora.rank
        self.member_chunk_size = member_chunk_size
        model, family = self.backbone.model, self.backbone.family
        if last_blocks == 0:
            model.requires_grad_(False)
            self.lora_modules: list[str] = []
        else:
            self.lora_modules = inject_lora(model, family, lora, num_members)
        # By name relative to self.backbone, for functional_call with a chunk's factors.
        self._layers = {f"model.{n}": layer for n, layer in lora_layers(model).items()}
        # The trunk is shared only when LoRA is restricted to the last blocks: with LoRA
        # everywhere it would hold just the embedding, and members would share its dropout.
        self._trunk = (
            SharedTrunk(model, family, first_block(self.lora_modules, family))
            if last_blocks is not None and self.lora_modules
            else None
        )
        train_backbone_weights(model, family, train_backbone)
        self.head = make_head(head, num_members, self.backbone.feature_dim, num_classes)
        if compile:
            model.compile()  # compiles the call in place: parameter names stay unchanged

    def forward(self, x: Inputs) -> Tensor:
        """All members' logits; chunks and the shared trunk change only how they are computed.

        Shape:
            ``(B, ...) -> (M, B, C)``
        """
        m = self.num_members
        if not self._layers:  # the head-only ensemble: one backbone pass for all members
            return self.head(self.backbone(x).repeat(m, 1))  # (M, B, C)
        batch = _batch_size(x)
        windows = self.member_chunks(batch, _device(x))
        if len(windows) == 1 and self._trunk is None:
            return self.head(self.backbone(repeat_members(x, m)))  # (M*B, D) -> (M, B, C)
        features = []
        try:
            for i, window in enumerate(windows):
                count = window.stop - window.start
                factors = member_factors(self._layers, window) if count < m else {}
                with self._fan_out(batch, count, i > 0):
                    inputs = repeat_members(x, count)
                    features.append(functional_call(self.backbone, factors, (inputs,)))
        finally:
            if self._trunk is not None:
                self._trunk.release()
        return self.head(torch.cat(features))  # (M, B, C)

    def member_chunks(self, batch: int, device: torch.device) -> list[slice]:
        """The member windows one forward pass runs for a batch of B samples on ``device``
        (one window: all members in one batch; ``member_chunk_size`` resolved)."""
        return member_chunks(self.num_members, batch, self.member_chunk_size, device)

    def _fan_out(
        self, batch: int, count: int, replay: bool
    ) -> contextlib.AbstractContextManager[None]:
        if self._trunk is None:
            return contextlib.nullcontext()
        return self._trunk.fan_out(batch, count, replay)

    @torch.no_grad()
    def member_weights(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Reference: the frozen pretrained projection ``W_0`` (a third of a fused qkv);
        members: ``W_0 + (alpha/R) B_i A_i`` (paper Eq. 3), for every adapted q, k, v, o.

        With ``train_backbone`` other than ``"none"`` the shared weight has moved too; the
        reference is then its current (shared, trained) value.

        Shape:
            ``{"<block>.<q|k|v|o>": ((D_out, D_in), (M, D_out, D_in))}``
        """
        if not self._layers:
            return super().member_weights()  # head-only: no member-specific projections
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
        return {**super().identity(), "rank": self.rank}


def _batch_size(x: Inputs) -> int:
    """B of an image tensor or of named token tensors."""
    return int((x if isinstance(x, Tensor) else next(iter(x.values()))).shape[0])


def _device(x: Inputs) -> torch.device:
    return (x if isinstance(x, Tensor) else next(iter(x.values()))).device


class LoRANetworkMethod(EnsembleMethod):
    """Base of methods whose M members all derive from one LoRA network (Snapshot Ensemble,
    Bayes-LoRA): it owns their prologue, building ``self.network``, a one-member
    :class:`LoRAEnsemble` with the given LoRA options, and shares its identity (backbone,
    rank).

    Args:
        num_classes: C (linked from the data module by the CLI).
        backbone: a registered backbone name.
        num_members: M, the members evaluated (snapshots, posterior samples).
        lora: the network's LoRA options (:class:`~lorae.lora.LoRASpec`).
        pretrained: ``True`` (download), ``False`` (random) or a local weights path.
        backbone_overrides: architecture arguments for the backbone constructor.

    Shape:
        network: inputs ``(B, ...)`` -> logits ``(1, B, C)``
    """

    network: LoRAEnsemble

    def __init__(
        self,
        num_classes: int,
        backbone: str,
        num_members: int,
        lora: LoRASpec = DEFAULT_LORA,
        pretrained: Pretrained = True,
        backbone_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_members < 1:
            raise ConfigError(f"num_members must be >= 1, got {num_members}.")
        self.num_classes = num_classes
        self.num_members = num_members
        self.network = LoRAEnsemble(
            num_classes,
            backbone,
            num_members=1,
            lora=lora,
            pretrained=pretrained,
            backbone_overrides=backbone_overrides,
        )

    def identity(self) -> dict[str, Any]:
        network = self.network.identity()
        shared = ("backbone", "backbone_overrides", "rank")
        return {**super().identity(), **{k: network[k] for k in shared if k in network}}
