"""timm Vision Transformers and DeiT (any ``vit_*`` / ``deit*`` timm model name)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import timm
from torch import Tensor

from lorae.backbones.base import (
    Backbone,
    Inputs,
    Pretrained,
    download_failed,
    image_batch,
    local_weights_path,
    merged_overrides,
)

TIMM_PATTERNS = ("vit_*", "deit*")


def is_timm_vit(name: str) -> bool:
    """Whether ``name`` (optionally with a ``.tag``) is a timm ViT or DeiT architecture."""
    architecture = name.split(".")[0]
    return architecture in timm.list_models(TIMM_PATTERNS)


class TimmViT(Backbone):
    """A timm ``VisionTransformer`` without its classifier; features are its pooled output.

    Shape:
        input ``(B, C_in, H, W)`` -> features ``(B, D)``
    """

    def forward(self, x: Inputs) -> Tensor:
        return self.model(image_batch(x, "timm ViT"))


def build_timm_vit(
    name: str, pretrained: Pretrained, overrides: Mapping[str, Any] | None
) -> TimmViT:
    """Build ``name`` with timm, ``num_classes=0`` so it returns pooled features.

    ``overrides`` are timm model arguments (``img_size``, ``patch_size``, ``embed_dim``,
    ``depth``, ``num_heads``, ``in_chans``, ...), e.g. for a small model trained from scratch.
    """
    kwargs = merged_overrides(overrides)
    if isinstance(pretrained, str):
        path = local_weights_path(name, pretrained, expect_dir=False)
        # custom_load says which loader reads the file: the JAX one for an original .npz, the
        # state-dict one (with timm's filter_fn) otherwise. timm before 1.0.31 kept the
        # default cfg's custom_load=True for a file overlay and read a .safetensors as .npz.
        kwargs["pretrained_cfg_overlay"] = {
            "file": str(path),
            "custom_load": path.suffix == ".npz",
        }
        pretrained = True
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except OSError as error:
        cfg = timm.get_pretrained_cfg(name.split(".")[0])
        hub = cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else name
        raise download_failed(
            name,
            error,
            f"https://huggingface.co/{hub} (model.safetensors)",
            "`pretrained: /path/to/model.safetensors`",
        ) from error
    return TimmViT(model, "timm_vit", cast(int, model.num_features))
