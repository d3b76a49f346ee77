"""The one contract every method implements: ``forward(x) -> (M, B, C)`` member logits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback
from torch import Tensor, nn

from lorae.backbones.base import Inputs
from lorae.errors import ConfigError


def repeat_members(x: Inputs, num_members: int) -> Inputs:
    """Members enter once, at the input: repeat the batch member-major.

    Row ``m*B + b`` of the result is sample ``b`` for member ``m``; named text inputs are
    repeated tensor by tensor.

    Shape:
        ``(B, ...) -> (M*B, ...)`` (each tensor of a mapping likewise)
    """
    if num_members == 1:
        return x
    if isinstance(x, Tensor):
        return x.repeat(num_members, *([1] * (x.dim() - 1)))
    return {k: v.repeat(num_members, *([1] * (v.dim() - 1))) for k, v in x.items()}


class EnsembleMethod(nn.Module):
    """Base of every method (LoRA-Ensemble and the paper's baselines).

    Subclasses set ``num_members`` and implement :meth:`forward`. Everything downstream
    (loss, predictive distribution, metrics, prediction files) reads only the returned
    member logits, so every method is evaluated by literally the same code.

    Shape:
        forward: inputs ``(B, ...)`` -> logits ``(M, B, C)``
    """

    num_members: int
    num_classes: int

    def forward(self, x: Inputs) -> Tensor:
        raise NotImplementedError

    def callbacks(self) -> list[Callback]:
        """Lightning callbacks the method needs (e.g. a snapshot schedule); none by default.

        :class:`~lorae.module.EnsembleClassifier` returns them from ``configure_callbacks``,
        so a method brings its own training-loop behaviour without a config entry.
        """
        return []

    def member_weights(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Weights for the weight-space analysis (paper section 4, appendix D).

        Returns:
            ``{"<block>.<projection>": (reference, members)}`` for every attention projection
            (``projection`` in q, k, v, o) the method makes member-specific: ``reference`` the
            pretrained weight ``(D_out, D_in)`` the members started from, ``members`` each
            member's effective weight ``(M, D_out, D_in)``.

        Raises:
            ConfigError: the method has no member-specific projection weights.
        """
        raise ConfigError(
            f"{type(self).__name__} has no member-specific attention weights to analyse; "
            "weight-space analysis supports methods that override member_weights()."
        )

    def identity(self) -> dict[str, Any]:
        """Settings a checkpoint must share with the config to be loadable into this method.

        Stored in every checkpoint and compared on load, so a mismatch (another
        ``num_members``, rank, backbone ...) is reported by name instead of as a tensor-shape
        error.
        """
        return {
            "method": type(self).__name__,
            "num_members": self.num_members,
            "num_classes": self.num_classes,
        }


def describe_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Lines ``key: checkpoint X, config Y`` for every setting that differs."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{key}: checkpoint {saved.get(key)!r}, config {current.get(key)!r}"
        for key in keys
        if saved.get(key) != current.get(key)
    ]
