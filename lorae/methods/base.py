"""The one contract every method implements: ``forward(x) -> (M, B, C)`` member logits;
and :class:`BackboneMethod`, the base of methods that hold one pretrained backbone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback
from torch import Tensor, nn

from lorae.backbones import create_backbone
from lorae.backbones.base import Backbone, Inputs, Pretrained
from lorae.errors import ConfigError
from lorae.optim import LRLambda, TrainingSteps


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

    def lr_schedule(self, steps: TrainingSteps) -> LRLambda | None:
        """The method's own learning-rate multiplier per optimizer step, or ``None``.

        :meth:`~lorae.module.EnsembleClassifier.configure_optimizers` builds its ``LambdaLR``
        from it (stepped every optimizer step); ``None`` (the default) takes the module's
        warm-up + ``lr_decay`` schedule. A method whose training is a schedule (Snapshot
        Ensemble's cycles) returns it here, so the schedule has one owner and resuming restores
        its position with the optimizer state.

        Args:
            steps: the training length and the module's warm-up.
        """
        return None

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


class BackboneMethod(EnsembleMethod):
    """Base of methods that hold one pretrained backbone, ``self.backbone``: it owns the
    prologue every such method shares (classes, members, :func:`~lorae.backbones.create_backbone`)
    and puts the backbone name into :meth:`identity`.

    Args:
        num_classes: C (linked from the data module by the CLI).
        backbone: a registered backbone name (:func:`lorae.backbones.known_backbones`).
        num_members: ensemble size M.
        pretrained: ``True`` (download), ``False`` (random) or a local weights path.
        backbone_overrides: architecture arguments for the backbone constructor.

    Raises:
        ConfigError: ``num_members < 1``, or the backbone cannot be built (unknown name,
            missing weights).

    Shape:
        backbone: inputs ``(B, ...)`` -> features ``(B, D)``
    """

    backbone: Backbone

    def __init__(
        self,
        num_classes: int,
        backbone: str,
        num_members: int,
        pretrained: Pretrained = True,
        backbone_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_members < 1:
            raise ConfigError(f"num_members must be >= 1, got {num_members}.")
        self.num_classes = num_classes
        self.num_members = num_members
        self.backbone_name = backbone
        self.backbone_overrides = dict(backbone_overrides or {})
        self.backbone = create_backbone(backbone, pretrained, backbone_overrides)

    def identity(self) -> dict[str, Any]:
        """Adds the backbone and, when set, its architecture overrides (another
        ``embed_dim`` or ``depth`` is another network: the check names the override)."""
        identity = {**super().identity(), "backbone": self.backbone_name}
        if self.backbone_overrides:
            identity["backbone_overrides"] = self.backbone_overrides
        return identity


def describe_mismatch(
    saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """Lines ``key: checkpoint X, config Y`` for every setting that differs; settings that
    are mappings on both sides are compared entry by entry (``backbone_overrides.depth``)."""
    lines: list[str] = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if isinstance(old, Mapping) or isinstance(new, Mapping):
            lines += describe_mismatch(old or {}, new or {}, f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key}: checkpoint {old!r}, config {new!r}")
    return lines
