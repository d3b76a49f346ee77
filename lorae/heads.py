"""Per-member classifier heads: where members leave the network as ``(M, B, C)`` logits."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


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
        self.num_members = num_members
        self.weight = nn.Parameter(torch.empty(num_members, num_classes, in_features))
        self.bias = nn.Parameter(torch.empty(num_members, num_classes))
        self.reset_parameters()

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
