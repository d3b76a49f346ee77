"""Monte Carlo Dropout as the paper compares against: DropKey (Li et al. 2023) by default.

Paper section 4 lists the baseline as "Monte Carlo Dropout (MC Dropout) as implemented in Li
et al. (2023)", i.e. DropKey (:mod:`lorae.lora.dropkey`): Bernoulli(p) masks on the
attention logits before the softmax, kept active at evaluation. Appendix T: "a dropout
probability of 0.2 offers a good balance between accuracy and calibration". The textbook MC
Dropout (Gal and Ghahramani 2016: every ``nn.Dropout`` kept active) stays available as
``variant: dropout``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor, nn

from lorae.backbones.base import Inputs, Pretrained
from lorae.errors import ConfigError
from lorae.heads import HeadKind, make_head
from lorae.lora.dropkey import DropKey
from lorae.methods.base import BackboneMethod, repeat_members
from lorae.methods.registry import register_method

#: ``"dropkey"``: DropKey on every attention module (the paper's baseline); ``"dropout"``:
#: every dropout layer of the backbone kept active at evaluation.
MCDropoutVariant = Literal["dropkey", "dropout"]


def set_dropout(model: nn.Module, p: float) -> int:
    """Set the drop probability of every dropout in ``model`` (``nn.Dropout`` layers and the
    attention dropout of ``nn.MultiheadAttention``); return how many there are.

    timm, torchvision and Hugging Face read these modules' probabilities at call time (the
    fused attention kernels included), so this reaches attention and MLP dropout alike.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
            count += 1
        elif isinstance(module, nn.MultiheadAttention):
            module.dropout = p
            count += 1
    return count


@register_method("mc_dropout")
class MCDropout(BackboneMethod):
    """A fully fine-tuned network whose members are M stochastic forward passes.

    ``variant: dropkey`` (default; paper section 4, "MC Dropout as implemented in Li et al.
    (2023)"): DropKey masks each attention key with probability ``dropout`` on the logits
    ``QKᵀ/sqrt(d)`` before the softmax, without rescaling, per row, head and query, in
    training and evaluation alike, in every attention module of the backbone (timm ViT and
    AST, torchvision ViT, BERT). The backbone's own dropout layers are left as the backbone
    defines them and follow the usual train/eval switch (the reference code leaves them
    alone too).

    ``variant: dropout`` (Gal and Ghahramani 2016): every dropout layer of the backbone is set
    to ``dropout`` and kept active at evaluation (the backbone stays in training mode; a ViT
    or BERT has no batch normalisation, so that changes nothing but dropout).

    In both, the input is repeated M times member-major and passed once through the
    backbone, so every row draws its own masks: one batched pass gives M different members.
    As in the paper's reference code, each member has its own head by default ("for a fair
    comparison with LoRA-Ensemble"; ``head: shared`` is the textbook single-head MC Dropout).

    Args:
        num_classes: C (linked from the data module by the CLI).
        backbone: a registered backbone name.
        num_members: M, the number of stochastic passes at evaluation.
        dropout: the drop probability p: of a key (DropKey) or of every dropout layer
            (appendix T: 0.2).
        variant: ``"dropkey"`` (default) or ``"dropout"``.
        head: ``"member"`` (one head per member, default) or ``"shared"``.
        pretrained: ``True`` (download), ``False`` (random) or a local weights path.
        backbone_overrides: architecture arguments for the backbone constructor.

    Raises:
        ConfigError: ``dropout`` is not in (0, 1), or the backbone has no attention module
            (DropKey) or no dropout layer (dropout) to make stochastic.

    Shape:
        inputs ``(B, ...)`` -> logits ``(M, B, C)``
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str,
        num_members: int = 16,
        dropout: float = 0.2,
        variant: MCDropoutVariant = "dropkey",
        head: HeadKind = "member",
        pretrained: Pretrained = True,
        backbone_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        if not 0.0 < dropout < 1.0:
            raise ConfigError(
                f"MC Dropout needs a dropout probability in (0, 1), got {dropout}: with 0 all "
                "members would be identical."
            )
        if variant not in ("dropkey", "dropout"):
            raise ConfigError(f"variant must be 'dropkey' or 'dropout', got {variant!r}.")
        super().__init__(num_classes, backbone, num_members, pretrained, backbone_overrides)
        self.variant: MCDropoutVariant = variant
        self.dropkey: DropKey | None = None
        if variant == "dropkey":
            self.dropkey = DropKey(dropout)
            if not self.dropkey.attach(self.backbone.model, self.backbone.family):
                raise ConfigError(
                    f"Backbone {backbone!r} has no attention module DropKey knows, so MC "
                    "Dropout members would all be identical; use `variant: dropout` or a "
                    "transformer backbone."
                )
        elif set_dropout(self.backbone, dropout) == 0:
            raise ConfigError(
                f"Backbone {backbone!r} has no dropout layer to keep active, so MC Dropout "
                "members would all be identical; use a backbone with dropout layers."
            )
        self.head = make_head(head, num_members, self.backbone.feature_dim, num_classes)

    def train(self, mode: bool = True) -> MCDropout:
        """``variant: dropout`` keeps the backbone's dropout active in evaluation mode too
        (DropKey's hooks are active in both modes on their own)."""
        super().train(mode)
        if self.variant == "dropout":
            self.backbone.train(True)
        return self

    def forward(self, x: Inputs) -> Tensor:
        return self.head(self.backbone(repeat_members(x, self.num_members)))  # (M, B, C)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "variant": self.variant}
