"""Monte Carlo Dropout (Gal and Ghahramani 2016; paper section 5 baselines)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lorae.backbones.base import Inputs, Pretrained
from lorae.errors import ConfigError
from lorae.heads import HeadKind, make_head
from lorae.methods.base import BackboneMethod, repeat_members
from lorae.methods.registry import register_method


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
    """A fully fine-tuned network with dropout kept active at evaluation: M stochastic
    forward passes are the members.

    In training and evaluation alike the input is repeated M times member-major and passed
    once through the backbone with dropout active, so every row draws its own dropout masks:
    one batched pass gives M different members. As in the paper's reference code, each
    member has its own head by default ("for a fair comparison with LoRA-Ensemble"; ``head:
    shared`` is the textbook single-head MC Dropout). The backbone (a ViT or BERT) has no
    batch normalisation, so training mode changes nothing but dropout.

    Args:
        num_classes: C (linked from the data module by the CLI).
        backbone: a registered backbone name.
        num_members: M, the number of stochastic passes at evaluation.
        dropout: the probability set on every dropout of the backbone (paper: 0.2).
        head: ``"member"`` (one head per member, default) or ``"shared"``.
        pretrained: ``True`` (download), ``False`` (random) or a local weights path.
        backbone_overrides: architecture arguments for the backbone constructor.

    Raises:
        ConfigError: ``dropout`` is not in (0, 1), or the backbone has no dropout.

    Shape:
        inputs ``(B, ...)`` -> logits ``(M, B, C)``
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str,
        num_members: int = 16,
        dropout: float = 0.2,
        head: HeadKind = "member",
        pretrained: Pretrained = True,
        backbone_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        if not 0.0 < dropout < 1.0:
            raise ConfigError(
                f"MC Dropout needs a dropout probability in (0, 1), got {dropout}: with 0 all "
                "members would be identical."
            )
        super().__init__(num_classes, backbone, num_members, pretrained, backbone_overrides)
        if set_dropout(self.backbone, dropout) == 0:
            raise ConfigError(
                f"Backbone {backbone!r} has no dropout layer to keep active, so MC Dropout "
                "members would all be identical; use a backbone with dropout layers."
            )
        self.head = make_head(head, num_members, self.backbone.feature_dim, num_classes)

    def train(self, mode: bool = True) -> MCDropout:
        """Keep the backbone's dropout active in evaluation mode too."""
        super().train(mode)
        self.backbone.train(True)
        return self

    def forward(self, x: Inputs) -> Tensor:
        return self.head(self.backbone(repeat_members(x, self.num_members)))  # (M, B, C)
