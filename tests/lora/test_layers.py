"""LoRAEnsembleLinear, its fused q/k/v variant and the nn.MultiheadAttention replacement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorae.errors import ConfigError
from lorae.lora import (
    LoRAEnsembleFusedLinear,
    LoRAEnsembleLinear,
    LoRASpec,
    MultiheadSelfAttention,
)
from lorae.lora.mha import replace_multihead_attention

M, B, T, D_IN, D_OUT, R = 3, 4, 5, 12, 10, 2
SPEC = LoRASpec(rank=R)


def _randomise_b(layer: LoRAEnsembleLinear) -> None:
    with torch.no_grad():
        layer.B.normal_()


def test_parameters_shapes_and_frozen_base() -> None:
    base = nn.Linear(D_IN, D_OUT)
    layer = LoRAEnsembleLinear(base, M, SPEC)
    assert layer.A.shape == (M, R, D_IN) and layer.B.shape == (M, D_OUT, R)
    assert layer.base is base, "the pretrained layer is kept, not copied"
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.A.requires_grad and layer.B.requires_grad
    assert torch.count_nonzero(layer.B) == 0
    names = dict(layer.named_parameters())
    assert set(names) == {"A", "B", "base.weight", "base.bias"}


def test_zero_b_equals_base() -> None:
    base = nn.Linear(D_IN, D_OUT)
    layer = LoRAEnsembleLinear(base, M, SPEC)
    x = torch.randn(M * B, T, D_IN)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [None, 4.0])
def test_each_member_uses_its_own_adapted_weight(alpha: float | None) -> None:
    base = nn.Linear(D_IN, D_OUT)
    layer = LoRAEnsembleLinear(base, M, LoRASpec(rank=R, alpha=alpha))
    _randomise_b(layer)
    scale = (R if alpha is None else alpha) / R
    assert layer.scale == scale
    x = torch.randn(M * B, T, D_IN)
    out = layer(x).view(M, B, T, D_OUT)
    for m in range(M):
        weight = base.weight + scale * layer.B[m] @ layer.A[m]
        expected = F.linear(x.view(M, B, T, D_IN)[m], weight, base.bias)
        torch.testing.assert_close(out[m], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight()[1], scale * layer.B[1] @ layer.A[1])


def test_xavier_init_bound_and_independent_members() -> None:
    layer = LoRAEnsembleLinear(nn.Linear(64, 32), 4, LoRASpec(rank=8, gain=10.0))
    bound = 10.0 * math.sqrt(6.0 / (64 + 8))
    assert layer.A.abs().max() <= bound
    assert layer.A.abs().max() > 0.5 * bound, "gain 10 must actually be applied"
    assert not torch.allclose(layer.A[0], layer.A[1]), "every member draws its own A"
    for member in layer.A:  # uniform(-b, b) has standard deviation b / sqrt(3)
        assert abs(member.std().item() - bound / math.sqrt(3)) < 0.1 * bound


def test_normal_init_std() -> None:
    torch.manual_seed(0)
    spec = LoRASpec(rank=16, init="normal", std=0.05)
    layer = LoRAEnsembleLinear(nn.Linear(256, 8), 8, spec)
    assert abs(layer.A.std().item() - 0.05) < 0.003
    assert abs(layer.A.mean().item()) < 0.003


@pytest.mark.parametrize(
    ("members", "options", "match"),
    [(0, {}, "num_members"), (2, {"rank": 0}, "rank"), (2, {"init": "kaiming"}, "init")],
)
def test_invalid_arguments(members: int, options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LoRAEnsembleLinear(nn.Linear(4, 4), members, LoRASpec(**options))  # type: ignore[arg-type]


def test_batch_not_multiple_of_members_is_a_clear_error() -> None:
    layer = LoRAEnsembleLinear(nn.Linear(D_IN, D_OUT), 3, SPEC)
    with pytest.raises(ValueError, match="multiple of the member count"):
        layer(torch.randn(4, D_IN))


@pytest.mark.parametrize("enabled", [("q", "k", "v"), ("q", "v"), ("k",)])
def test_fused_equals_separate_q_k_v_deltas(enabled: tuple[str, ...]) -> None:
    d = 8
    base = nn.Linear(d, 3 * d)
    layer = LoRAEnsembleFusedLinear(base, ("q", "k", "v"), enabled, M, SPEC)
    assert layer.A.shape == (M, len(enabled), R, d) and layer.B.shape == (M, len(enabled), d, R)
    _randomise_b(layer)
    x = torch.randn(M * B, T, d)
    out = layer(x).view(M, B, T, 3, d)
    xs = x.view(M, B, T, d)
    w = base.weight.view(3, d, d)
    bias = base.bias.view(3, d)
    for m in range(M):
        for slot, part in enumerate(("q", "k", "v")):
            weight = w[slot]
            if part in enabled:
                j = enabled.index(part)
                weight = weight + layer.B[m, j] @ layer.A[m, j]
            expected = F.linear(xs[m], weight, bias[slot])
            torch.testing.assert_close(out[m, :, :, slot], expected, rtol=1e-5, atol=1e-5)


def test_fused_rejects_unknown_part() -> None:
    with pytest.raises(ConfigError, match="subset"):
        LoRAEnsembleFusedLinear(nn.Linear(4, 12), ("q", "k", "v"), ("x",), 2, SPEC)


def test_bf16_autocast_agrees_with_float32() -> None:
    torch.manual_seed(0)
    qkv = ("q", "k", "v")
    layer = LoRAEnsembleFusedLinear(nn.Linear(32, 96), qkv, qkv, M, LoRASpec(rank=4))
    _randomise_b(layer)
    x = torch.randn(M * B, T, 32)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    assert low.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits: relative error around 2^-8 of the output scale.
    torch.testing.assert_close(
        low.float(), reference, rtol=0.05, atol=0.05 * reference.abs().max().item()
    )


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "both", "float"])
def test_mha_replacement_matches_torch(batch_first: bool, masks: str) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    ours = MultiheadSelfAttention.from_module(mha).eval()
    assert ours.qkv.weight is mha.in_proj_weight, "weights are shared, not copied"
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    kwargs: dict[str, torch.Tensor] = {}
    if masks in ("padding", "both"):
        kwargs["key_padding_mask"] = padding
    if masks in ("causal", "both"):
        kwargs["attn_mask"] = causal
    if masks == "float":
        kwargs["attn_mask"] = torch.randn(5, 5)
    expected = mha(x, x, x, need_weights=False, **kwargs)[0]
    actual, weights = ours(x, x, x, need_weights=False, **kwargs)
    assert weights is None
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_mha_replacement_refuses_what_it_cannot_do() -> None:
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    ours = MultiheadSelfAttention.from_module(mha)
    x, y = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    with pytest.raises(NotImplementedError, match="self-attention"):
        ours(x, y, y, need_weights=False)
    with pytest.raises(NotImplementedError, match="weights"):
        ours(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="self-attention"):
        MultiheadSelfAttention.from_module(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))


def test_replace_multihead_attention_in_a_model() -> None:
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    assert replace_multihead_attention(model) == ["0"]
    assert isinstance(model[0], MultiheadSelfAttention)
