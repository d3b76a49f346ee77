"""Audio Spectrogram Transformer (Gong et al. 2021), the paper's ESC-50 backbone.

AST is a DeiT applied to a log-mel spectrogram ``(1, F, T)`` with overlapping 16x16 patches
(stride 10 in both axes). Its ImageNet weights are transferred as in the AST paper: the patch
projection of the 3 RGB channels is summed into one input channel, and the positional
embeddings of the ImageNet patch grid are cut (from the middle) or bilinearly interpolated to
the spectrogram's patch grid, per axis. The result is a plain timm ``VisionTransformer``
(family ``timm_vit``), so LoRA injects into it exactly as into any timm ViT.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from lorae.backbones.base import Backbone, Inputs, Pretrained, image_batch
from lorae.backbones.timm_vit import build_timm_vit
from lorae.errors import ConfigError

__all__ = [
    "AST_SOURCE",
    "ASTBackbone",
    "adapt_positional_embedding",
    "build_ast",
    "spectrogram_grid",
]

#: ImageNet model whose weights AST starts from (AST's ``imagenet_pretrain=True``).
AST_SOURCE = "deit_base_distilled_patch16_384"
#: AST arguments accepted in ``backbone_overrides``; all other keys go to timm's constructor of
#: the source model (e.g. ``embed_dim``, ``depth`` for a tiny test model).
AST_OPTIONS = ("source", "input_fdim", "input_tdim", "fstride", "tstride")


def spectrogram_grid(
    input_fdim: int, input_tdim: int, patch: int, fstride: int, tstride: int
) -> tuple[int, int]:
    """Patches along frequency and time of an overlapping patch grid: ``(F - p) // s + 1``."""
    if input_fdim < patch or input_tdim < patch:
        raise ConfigError(
            f"AST input ({input_fdim} mel bins x {input_tdim} frames) is smaller than one "
            f"{patch}x{patch} patch."
        )
    return (input_fdim - patch) // fstride + 1, (input_tdim - patch) // tstride + 1


def _fit_axis(grid: Tensor, size: int, axis: int) -> Tensor:
    """Cut the middle ``size`` rows/columns of ``grid`` along ``axis`` (2 or 3), or bilinearly
    interpolate that axis to ``size`` when it is shorter (AST's rule)."""
    old = grid.shape[axis]
    if size <= old:
        start = old // 2 - size // 2
        return grid.narrow(axis, start, size)
    target = (size, grid.shape[3]) if axis == 2 else (grid.shape[2], size)
    return F.interpolate(grid, size=target, mode="bilinear")


def adapt_positional_embedding(
    pos_embed: Tensor, num_prefix: int, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> Tensor:
    """Fit ImageNet positional embeddings to the spectrogram patch grid (AST section 2.2).

    The patch embeddings, seen as a ``(D, H, W)`` image, are fitted first along time (width),
    then along frequency (height): each axis is cut from the middle when the new grid is not
    longer, else bilinearly interpolated. Prefix tokens (class, distillation) keep theirs.

    Shape:
        - pos_embed: ``(1, num_prefix + H * W, D)``.
        - output: ``(1, num_prefix + F_grid * T_grid, D)``.
    """
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    d = pos_embed.shape[-1]
    if patches.shape[1] != old_grid[0] * old_grid[1]:
        raise ConfigError(
            f"Positional embedding has {patches.shape[1]} patch entries, not the "
            f"{old_grid[0]}x{old_grid[1]} grid of the source model."
        )
    grid = patches.transpose(1, 2).reshape(1, d, *old_grid)
    grid = _fit_axis(grid, new_grid[1], axis=3)
    grid = _fit_axis(grid, new_grid[0], axis=2)
    patches = grid.reshape(1, d, new_grid[0] * new_grid[1]).transpose(1, 2)
    return torch.cat([prefix, patches], dim=1)


def transfer_to_spectrogram(
    model: VisionTransformer, input_fdim: int, input_tdim: int, fstride: int, tstride: int
) -> None:
    """Turn an ImageNet timm ViT/DeiT into an AST in place (one input channel, overlapping
    patches, positional embeddings fitted to the new grid)."""
    patch_embed = cast(PatchEmbed, model.patch_embed)
    old_proj = patch_embed.proj
    patch = old_proj.kernel_size[0]
    old_grid = (int(patch_embed.grid_size[0]), int(patch_embed.grid_size[1]))
    if old_proj.kernel_size[0] != old_proj.kernel_size[1]:
        raise ConfigError(f"AST needs square patches, the source has {old_proj.kernel_size}.")
    new_grid = spectrogram_grid(input_fdim, input_tdim, patch, fstride, tstride)
    proj = nn.Conv2d(1, old_proj.out_channels, patch, stride=(fstride, tstride))
    with torch.no_grad():
        proj.weight.copy_(old_proj.weight.sum(dim=1, keepdim=True))
        if old_proj.bias is not None and proj.bias is not None:
            proj.bias.copy_(old_proj.bias)
    patch_embed.proj = proj
    patch_embed.img_size = (input_fdim, input_tdim)
    patch_embed.grid_size = new_grid
    patch_embed.num_patches = new_grid[0] * new_grid[1]
    num_prefix = 0 if model.no_embed_class else int(model.num_prefix_tokens)
    if model.pos_embed is None:
        raise ConfigError("AST needs a source ViT with learned positional embeddings.")
    pos = adapt_positional_embedding(model.pos_embed.detach(), num_prefix, old_grid, new_grid)
    model.pos_embed = nn.Parameter(pos)


class ASTBackbone(Backbone):
    """AST on log-mel spectrograms; features are the mean of the class and distillation tokens
    (timm's distilled DeiT head), as in AST.

    Shape:
        input ``(B, 1, F, T)`` (mel bins x frames) -> features ``(B, D)``
    """

    def forward(self, x: Inputs) -> Tensor:
        spectrogram = image_batch(x, "AST")
        if spectrogram.dim() == 3:  # (B, F, T) without the channel axis
            spectrogram = spectrogram.unsqueeze(1)
        return self.model(spectrogram)


def build_ast(
    name: str, pretrained: Pretrained, overrides: Mapping[str, Any] | None
) -> ASTBackbone:
    """Build AST from the ImageNet DeiT ``source`` (default :data:`AST_SOURCE`).

    ``pretrained`` is passed to the source model (``True`` downloads its ImageNet weights through
    timm, a path loads a local ``.safetensors`` file, ``False`` is random). ``overrides`` take
    ``input_fdim`` (mel bins, default 128), ``input_tdim`` (frames, default 1024; ESC-50: 512),
    ``fstride``/``tstride`` (default 10), ``source`` and timm arguments of the source model.
    """
    options = dict(overrides or {})
    source = str(options.pop("source", AST_SOURCE))
    input_fdim = int(options.pop("input_fdim", 128))
    input_tdim = int(options.pop("input_tdim", 1024))
    fstride = int(options.pop("fstride", 10))
    tstride = int(options.pop("tstride", 10))
    vit = build_timm_vit(source, pretrained, options)
    transfer_to_spectrogram(
        cast(VisionTransformer, vit.model), input_fdim, input_tdim, fstride, tstride
    )
    return ASTBackbone(vit.model, "timm_vit", vit.feature_dim)
