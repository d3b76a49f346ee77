"""FiLM-Ensemble for transformers (Turkoglu et al. 2022; paper appendix V, Tab. 23).

The paper, appendix V: "applying FiLM-Ensemble to transformers is not straightforward, mainly
because transformers rely on LayerNorm, whereas FiLM-Ensemble was developed with BatchNorm in
mind. [...] We explored several approaches to adapt LayerNorm, but the most effective results
were achieved by fixing all affine parameters for each ensemble member. This allowed for slight
initial variations to introduce randomness and diversity, while keeping the variation among
members minimal."

How lorae reads "fixing all affine parameters for each ensemble member": *all* LayerNorms'
affine parameters (scale gamma and shift beta, the FiLM modulation of a normalisation layer)
are *fixed per member*, i.e. each member owns its own copy of every LayerNorm's gamma and beta
(instead of one shared set), and these member-specific affines train while all other backbone
weights stay frozen and shared. Why this reading, and not "frozen at their pretrained values":
with every affine frozen the members would differ only at initialisation and in their heads,
and the next sentence, "This allowed for slight initial variations to introduce randomness and
diversity", describes member-specific copies that start slightly apart: gamma_i = gamma +
sigma eps, beta_i = beta + sigma eps' (``init_std`` = sigma), the random start of FiLM-Ensemble's
per-member modulation. "keeping the variation among members minimal" is the small sigma. Each
member has its own head, as in every ensemble here. ``configs/cifar10/film_ensemble_m{1,2,4}.yaml``
are the three rows of Tab. 23.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorae.backbones.base import Inputs, Pretrained
from lorae.errors import ConfigError
from lorae.heads import EnsembleHead
from lorae.methods.base import BackboneMethod, repeat_members
from lorae.methods.registry import register_method


class MemberLayerNorm(nn.Module):
    """LayerNorm whose affine scale and shift are member-specific (feature-wise linear
    modulation): ``y_i = gamma_i ∘ norm(x) + beta_i``.

    Initialised around the pretrained affine parameters: ``gamma_i = gamma + sigma eps``,
    ``beta_i = beta + sigma eps'`` with independent ``eps, eps' ~ N(0, 1)`` per member.

    Shape:
        - weight, bias: ``(M, D)``
        - input ``(M*B, ..., D)`` member-major, output the same shape
    """

    def __init__(self, norm: nn.LayerNorm, num_members: int, init_std: float) -> None:
        super().__init__()
        if len(norm.normalized_shape) != 1 or norm.weight is None or norm.bias is None:
            raise ConfigError("FiLM-Ensemble needs affine LayerNorms over the last axis.")
        self.eps = norm.eps
        weight, bias = norm.weight.detach(), norm.bias.detach()
        self.weight = nn.Parameter(weight.repeat(num_members, 1))
        self.bias = nn.Parameter(bias.repeat(num_members, 1))
        with torch.no_grad():
            self.weight.add_(torch.randn_like(self.weight), alpha=init_std)
            self.bias.add_(torch.randn_like(self.bias), alpha=init_std)

    def forward(self, x: Tensor) -> Tensor:
        m, d = self.weight.shape
        normed = F.layer_norm(x, (d,), eps=self.eps).view(m, -1, d)
        out = normed * self.weight.unsqueeze(1).to(normed.dtype) + self.bias.unsqueeze(1)
        return out.view(x.shape).to(normed.dtype)


@register_method("film_ensemble")
class FiLMEnsemble(BackboneMethod):
    """Members share the frozen backbone and differ only in every LayerNorm's affine
    parameters (and their heads), run in one batched pass.

    Args:
        num_classes: C (linked from the data module by the CLI).
        backbone: a registered backbone name.
        num_members: M.
        init_std: spread sigma of the members' scale and shift around the pretrained values.
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
        init_std: float = 0.05,
        pretrained: Pretrained = True,
        backbone_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(num_classes, backbone, num_members, pretrained, backbone_overrides)
        self.backbone.requires_grad_(False)
        names = [n for n, m in self.backbone.named_modules() if isinstance(m, nn.LayerNorm)]
        if not names:
            raise ConfigError(f"Backbone {backbone!r} has no LayerNorm for FiLM-Ensemble.")
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = self.backbone.get_submodule(parent_name)
            setattr(parent, child, MemberLayerNorm(getattr(parent, child), num_members, init_std))
        self.head = EnsembleHead(num_members, self.backbone.feature_dim, num_classes)

    def forward(self, x: Inputs) -> Tensor:
        return self.head(self.backbone(repeat_members(x, self.num_members)))
