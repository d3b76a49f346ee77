"""The backbone contract: a network that maps a batch to one feature vector per sample."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeAlias

from torch import Tensor, nn

from lorae.errors import ConfigError, WeightsNotFoundError

#: The architecture families lorae knows; each backbone builder declares its own. LoRA's target
#: table (:data:`lorae.lora.targets.TARGETS`) has one entry per family, under the same name.
BackboneFamily = Literal["timm_vit", "torchvision_vit", "hf_bert"]
#: A batch of model inputs: an image tensor ``(B, ...)`` or named text tensors ``(B, T)``.
Inputs: TypeAlias = Tensor | Mapping[str, Tensor]
#: ``True`` downloads the published weights, ``False`` initialises randomly, a path loads
#: a local file (timm, torchvision) or folder (Hugging Face).
Pretrained: TypeAlias = bool | str


class Backbone(nn.Module):
    """A feature extractor ``(B, ...) -> (B, D)`` whose inner network is ``self.model``.

    LoRA targets (:mod:`lorae.lora.targets`) are module names inside ``self.model``, looked
    up by ``family``.

    Attributes:
        family: the LoRA target-table family of ``model``.
        feature_dim: D, the width of the returned features.
        model: the wrapped network.
    """

    family: BackboneFamily
    feature_dim: int

    def __init__(self, model: nn.Module, family: BackboneFamily, feature_dim: int) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.feature_dim = feature_dim

    def forward(self, x: Inputs) -> Tensor:
        """Shape: ``(B, ...) -> (B, D)``."""
        raise NotImplementedError


def image_batch(x: Inputs, name: str) -> Tensor:
    """``x`` as an image tensor, or a clear error when a text batch reached a vision backbone."""
    if not isinstance(x, Tensor):
        raise ConfigError(
            f"Backbone {name!r} takes image tensors but the data module yields token "
            f"tensors ({sorted(x)}): use a text backbone (e.g. bert-base-uncased) with text "
            "data, or an image data module with a vision backbone."
        )
    return x


def token_batch(x: Inputs, name: str) -> Mapping[str, Tensor]:
    """``x`` as named token tensors, or a clear error when images reached a text backbone."""
    if isinstance(x, Tensor):
        raise ConfigError(
            f"Backbone {name!r} takes token tensors but the data module yields a tensor of "
            f"shape {tuple(x.shape)}: use TextClassificationDataModule with a text backbone, "
            "or a vision backbone (e.g. vit_b_32) with image data."
        )
    return x


def local_weights_path(name: str, pretrained: str, expect_dir: bool) -> Path:
    """Resolve a user-given weights path, failing with a message that says what to put where."""
    path = Path(pretrained).expanduser()
    kind = "folder" if expect_dir else "file"
    if not path.exists() or path.is_dir() != expect_dir:
        raise WeightsNotFoundError(
            f"Pretrained weights for backbone {name!r}: expected a {kind} at {str(path)!r}, "
            f"but {'nothing is there' if not path.exists() else 'it is not a ' + kind}. "
            "Pass the path of the downloaded weights, or `pretrained: true` on a machine with "
            "internet access, or `pretrained: false` for random initialisation."
        )
    return path


def download_failed(name: str, error: Exception, source: str, how: str) -> WeightsNotFoundError:
    """The error raised when the library's own download of pretrained weights fails."""
    return WeightsNotFoundError(
        f"Could not download pretrained weights for backbone {name!r} ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else 'no details'}). No internet here? "
        f"Download them on a machine with internet from {source}, copy them to this machine "
        f"and pass their path: {how}. Or use `pretrained: false` to start from random weights."
    )


def merged_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """A fresh dict of architecture overrides (``None`` means none)."""
    return dict(overrides or {})
