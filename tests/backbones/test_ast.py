"""AST backbone: ImageNet-to-spectrogram transfer on a tiny DeiT, and LoRA on top of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorae.backbones import create_backbone
from lorae.backbones.ast import adapt_positional_embedding, spectrogram_grid
from lorae.lora import LoRASpec, inject_lora

# A tiny distilled DeiT "pretrained" on 64x64 images: a 4x4 grid of 16x16 patches.
SOURCE = {
    "source": "deit_tiny_distilled_patch16_224",
    "img_size": 64,
    "embed_dim": 16,
    "depth": 2,
    "num_heads": 2,
}


def _tiny_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    options = {k: v for k, v in SOURCE.items() if k != "source"}
    model = timm.create_model(str(SOURCE["source"]), num_classes=0, **options)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("deit") / "model.safetensors"
    save_file(state, str(path))
    return str(path), state


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    return _tiny_source(tmp_path_factory)


def _ast(path: str, fdim: int, tdim: int) -> torch.nn.Module:
    overrides = {**SOURCE, "input_fdim": fdim, "input_tdim": tdim}
    return create_backbone("ast", path, overrides)


def _interp_half_pixel(values: np.ndarray, size: int) -> np.ndarray:
    """Linear interpolation of the last axis with half-pixel centres (bilinear,
    align_corners=False), written independently with numpy."""
    old = values.shape[-1]
    centres = (np.arange(size) + 0.5) * old / size - 0.5
    centres = np.clip(centres, 0, old - 1)
    return np.apply_along_axis(lambda v: np.interp(centres, np.arange(old), v), -1, values)


def test_grid_and_shapes(source: tuple[str, dict[str, torch.Tensor]]) -> None:
    path, _ = source
    assert spectrogram_grid(128, 1024, 16, 10, 10) == (12, 101)  # AST's 1,212 patches
    assert spectrogram_grid(128, 512, 16, 10, 10) == (12, 50)  # its ESC-50 setting
    backbone = _ast(path, fdim=32, tdim=96)
    model = backbone.model
    assert model.patch_embed.grid_size == (2, 9)
    assert model.patch_embed.proj.weight.shape == (16, 1, 16, 16)
    assert model.patch_embed.proj.stride == (10, 10)
    assert model.pos_embed.shape == (1, 2 + 2 * 9, 16)  # class + distillation tokens
    features = backbone(torch.randn(3, 1, 32, 96))
    assert features.shape == (3, backbone.feature_dim) == (3, 16)
    assert backbone(torch.randn(3, 32, 96)).shape == (3, 16)  # (B, F, T) accepted too


def test_weight_transfer(source: tuple[str, dict[str, torch.Tensor]]) -> None:
    path, state = source
    model = _ast(path, fdim=32, tdim=96).model
    proj = state["patch_embed.proj.weight"]  # (D, 3, 16, 16)
    assert torch.allclose(model.patch_embed.proj.weight, proj.sum(1, keepdim=True))
    assert torch.equal(model.patch_embed.proj.bias, state["patch_embed.proj.bias"])
    assert torch.equal(model.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    pos = state["pos_embed"]  # (1, 2 + 16, D)
    new = model.pos_embed.detach()
    assert torch.equal(new[:, :2], pos[:, :2])
    grid = pos[0, 2:].T.reshape(16, 4, 4).numpy()  # (D, H=freq, W=time)
    # Frequency 4 -> 2: the middle two rows are kept. Time 4 -> 9: interpolated.
    expected = _interp_half_pixel(grid[:, 1:3, :], 9)
    got = new[0, 2:].T.reshape(16, 2, 9).numpy()
    assert np.allclose(got, expected, atol=1e-5)


def test_positional_embedding_cut_in_both_axes() -> None:
    pos = torch.arange(1 + 6 * 6, dtype=torch.float32).reshape(1, 37, 1).repeat(1, 1, 2)
    out = adapt_positional_embedding(pos, 1, (6, 6), (2, 4))
    grid = pos[0, 1:, 0].reshape(6, 6)
    assert torch.equal(out[0, 0], pos[0, 0])
    assert torch.equal(out[0, 1:, 0].reshape(2, 4), grid[2:4, 1:5])


def test_lora_with_zero_b_leaves_ast_unchanged(source: tuple[str, dict[str, torch.Tensor]]) -> None:
    path, _ = source
    backbone = _ast(path, fdim=32, tdim=96).eval()
    x = torch.randn(2, 1, 32, 96)
    with torch.no_grad():
        before = backbone(x)
    adapted = inject_lora(backbone.model, backbone.family, LoRASpec(rank=2), num_members=1)
    assert adapted == [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("qkv", "proj")]
    with torch.no_grad():
        after = backbone(x)
    assert torch.allclose(before, after, atol=1e-6)
    with torch.no_grad():  # B is the zero init; give it values and the output moves
        for name, parameter in backbone.model.named_parameters():
            if name.endswith(".B"):
                parameter.normal_()
        assert not torch.allclose(backbone(x), before, atol=1e-4)
