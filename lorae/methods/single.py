"""Single Network baseline: the whole pretrained backbone fine-tuned, one head (M = 1)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lorae.backbones.base import Inputs, Pretrained
from lorae.heads import EnsembleHead
from lorae.methods.base import BackboneMethod
from lorae.methods.registry import register_method


@register_method("single_network")
class SingleNetwork(BackboneMethod):
    """Ordinary full fine-tuning of the backbone with one linear head (paper Tab. 1, "Single
    Network"). Returns a one-member ensemble so it is evaluated by the same code as every
    ensemble.

    Args:
        num_classes: C (linked from the data module by the CLI).
        backbone: a registered backbone name.
        pretrained: ``True`` (download), ``False`` (random) or a local weights path.
        backbone_overrides: architecture arguments for the backbone constructor.

    Shape:
        inputs ``(B, ...)`` -> logits ``(1, B, C)``
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str,
        pretrained: Pretrained = True,
        backbone_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(num_classes, backbone, 1, pretrained, backbone_overrides)
        self.head = EnsembleHead(1, self.backbone.feature_dim, num_classes)

    def forward(self, x: Inputs) -> Tensor:
        return self.head(self.backbone(x))
