"""Per-member classifier heads: where members leave the network as ``(M, B, C)`` logits."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from lorae.errors import ConfigError


class EnsembleHead(nn.Module):
    """M independent linear classifiers applied to member-major features in one batched matmul.

    Each member's head is initialised independently like ``nn.Linear`` (Kaiming-uniform
    weights, uniform bias), so members differ from the first step even with a shared
    backbone (paper section 3: every member has its own head).

    Args:
        num_members: ensemble size M.
        in_features: feature width D.
        num_classes: number of classes C.

    Shape:
        - weight: ``(M, C, D)``, bias: ``(M, C)``
        - input: ``(M*B, D)`` member-major (row ``m*B + b`` is sample b of member m)
        - output: ``(M, B, C)``
    """

    def __init__(self, num_members: int, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_members, num_classes, in_features))
        self.bias = nn.Parameter(torch.empty(num_members, num_classes))
        self.reset_parameters()

    @property
    def num_members(self) -> int:
        """M, read from the weight (``functional_call`` may pass other stacked heads)."""
        return int(self.weight.shape[0])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[-1])
        for weight in self.weight:
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, features: Tensor) -> Tensor:
        m = self.num_members
        if features.shape[0] % m != 0:
            raise ValueError(
                f"EnsembleHead with {m} members got {features.shape[0]} rows; expected M*B."
            )
        x = features.reshape(m, -1, features.shape[-1])  # (M, B, D)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2).to(x.dtype))


HeadKind = Literal["member", "shared"]


class SharedHead(nn.Module):
    """One linear classifier shared by all members (paper Tab. 13, "shared head"): members
    differ only through the backbone, still leaving as ``(M, B, C)``.

    Shape:
        input ``(M*B, D)`` member-major -> output ``(M, B, C)``
    """

    def __init__(self, num_members: int, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.num_members = num_members
        self.linear = EnsembleHead(1, in_features, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        logits = self.linear(features)[0]  # (M*B, C)
        return logits.reshape(self.num_members, -1, logits.shape[-1])


def make_head(kind: HeadKind, num_members: int, in_features: int, num_classes: int) -> nn.Module:
    """``"member"``: M independent heads (the paper's default); ``"shared"``: one head."""
    if kind == "member":
        return EnsembleHead(num_members, in_features, num_classes)
    if kind == "shared":
        return SharedHead(num_members, in_features, num_classes)
    raise ConfigError(f"head must be 'member' or 'shared', got {kind!r}.")
