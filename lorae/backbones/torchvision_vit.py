"""torchvision Vision Transformers (``vit_b_32`` is the paper's backbone)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer

from lorae.backbones.base import (
    Backbone,
    Inputs,
    Pretrained,
    download_failed,
    image_batch,
    local_weights_path,
    merged_overrides,
)
from lorae.errors import ConfigError

#: ``VisionTransformer`` arguments of each torchvision architecture (its builders hard-code
#: them, so they are repeated here to allow overrides such as a smaller ``image_size``).
TORCHVISION_VITS: dict[str, dict[str, int]] = {
    "vit_b_16": {
        "patch_size": 16,
        "num_layers": 12,
        "num_heads": 12,
        "hidden_dim": 768,
        "mlp_dim": 3072,
    },
    "vit_b_32": {
        "patch_size": 32,
        "num_layers": 12,
        "num_heads": 12,
        "hidden_dim": 768,
        "mlp_dim": 3072,
    },
    "vit_l_16": {
        "patch_size": 16,
        "num_layers": 24,
        "num_heads": 16,
        "hidden_dim": 1024,
        "mlp_dim": 4096,
    },
    "vit_l_32": {
        "patch_size": 32,
        "num_layers": 24,
        "num_heads": 16,
        "hidden_dim": 1024,
        "mlp_dim": 4096,
    },
    "vit_h_14": {
        "patch_size": 14,
        "num_layers": 32,
        "num_heads": 16,
        "hidden_dim": 1280,
        "mlp_dim": 5120,
    },
}


class TorchvisionViT(Backbone):
    """torchvision ``VisionTransformer`` with ``heads`` removed; features are the class token.

    Shape:
        input ``(B, 3, H, W)`` -> features ``(B, D)``
    """

    def forward(self, x: Inputs) -> Tensor:
        return self.model(image_batch(x, "torchvision ViT"))


def _load_state_dict(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _load_backbone_weights(
    model: nn.Module, state: dict[str, Tensor], name: str, source: str
) -> None:
    """Load everything but the classifier ``heads``; a wrong architecture is a clear error."""
    body = {k: v for k, v in state.items() if not k.startswith("heads.")}
    try:
        model.load_state_dict(body)
    except RuntimeError as error:
        raise ConfigError(
            f"The weights in {source} do not fit backbone {name!r} with the configured "
            f"backbone_overrides: {str(error).splitlines()[-1].strip()} Use weights of the "
            "same architecture, or remove the overrides that change its shape."
        ) from error


def build_torchvision_vit(
    name: str, pretrained: Pretrained, overrides: Mapping[str, Any] | None
) -> TorchvisionViT:
    """Build ``torchvision.models.<name>``; ``overrides`` are ``VisionTransformer`` arguments
    (``image_size``, ``patch_size``, ``num_layers``, ``num_heads``, ``hidden_dim``, ``mlp_dim``).
    """
    model = VisionTransformer(
        **{"image_size": 224, **TORCHVISION_VITS[name], **merged_overrides(overrides)}
    )
    model.heads = nn.Identity()  # features only: the published ImageNet head is dropped
    if pretrained is True:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            state = weights.get_state_dict(progress=True)
        except OSError as error:
            raise download_failed(
                name,
                error,
                weights.url,
                f"`pretrained: /path/to/{weights.url.rsplit('/', 1)[-1]}` (or place the file "
                f"in {torch.hub.get_dir()}/checkpoints/)",
            ) from error
        _load_backbone_weights(model, state, name, weights.url)
    elif isinstance(pretrained, str):
        path = local_weights_path(name, pretrained, expect_dir=False)
        _load_backbone_weights(model, _load_state_dict(str(path)), name, str(path))
    return TorchvisionViT(model, "torchvision_vit", int(model.hidden_dim))
