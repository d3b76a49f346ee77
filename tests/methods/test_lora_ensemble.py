"""LoRA-Ensemble variants (paper Tab. 7, 13, 18, appendix F) and its member weights."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from torch import nn

from lorae.backbones import create_backbone
from lorae.errors import ConfigError
from lorae.lora import LoRASpec, lora_layers
from lorae.methods import LoRAEnsemble, repeat_members
from tests.fixtures.models import FAMILIES, TINY_BACKBONES, tiny_inputs

M, B, C = 3, 4, 5


def _lora(family: str, seed: int = 0, **kwargs: object) -> LoRAEnsemble:
    """A tiny LoRA-Ensemble; LoRASpec fields among ``kwargs`` go into its ``lora`` (rank 2)."""
    name, overrides = TINY_BACKBONES[family]
    torch.manual_seed(seed)
    options = {k: kwargs.pop(k) for k in [f.name for f in fields(LoRASpec)] if k in kwargs}
    return LoRAEnsemble(
        C,
        name,
        num_members=kwargs.pop("num_members", M),  # type: ignore[arg-type]
        lora=LoRASpec(**{"rank": 2, **options}),  # type: ignore[arg-type]
        pretrained=False,
        backbone_overrides=overrides,
        **kwargs,  # type: ignore[arg-type]
    ).eval()


def _randomise(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.B.copy_(torch.randn(layer.B.shape, generator=generator) * 0.1)


def _pretrained_attention(family: str) -> dict[str, torch.Tensor]:
    """q/k/v/o weights of the same random backbone, read from the untouched model."""
    name, overrides = TINY_BACKBONES[family]
    torch.manual_seed(0)
    model = create_backbone(name, False, overrides).model
    out: dict[str, torch.Tensor] = {}
    for block in range(2):
        if family == "timm_vit":
            qkv = model.blocks[block].attn.qkv.weight
            o = model.blocks[block].attn.proj.weight
        elif family == "torchvision_vit":
            attn = model.encoder.layers[block].self_attention
            qkv, o = attn.in_proj_weight, attn.out_proj.weight
        else:
            layer = model.encoder.layer[block].attention
            qkv = torch.cat(
                [layer.self.query.weight, layer.self.key.weight, layer.self.value.weight]
            )
            o = layer.output.dense.weight
        for j, key in enumerate("qkv"):
            out[f"{block}.{key}"] = qkv.chunk(3)[j]
        out[f"{block}.o"] = o
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_member_weights_reference_is_pretrained_and_members_compute_the_layer(family: str) -> None:
    model = _lora(family)
    _randomise(model)
    weights = model.member_weights()
    expected = _pretrained_attention(family)
    assert sorted(weights) == sorted(expected)
    for key, (reference, members) in weights.items():
        torch.testing.assert_close(reference, expected[key], rtol=0, atol=0)
        assert members.shape == (M, *reference.shape)
        assert not torch.allclose(members[0], members[1])
    # The members' weights reproduce what the batched layer computes, member by member.
    layers = lora_layers(model)
    name = next(n for n in layers if n.endswith(("qkv", "proj", "query")))
    layer = layers[name]
    block = 0
    keys = ("q", "k", "v") if name.endswith("qkv") else ("o",) if name.endswith("proj") else ("q",)
    x = torch.randn(M * 2, layer.base.in_features)
    with torch.no_grad():
        out = layer(x).view(M, 2, -1)
    for m in range(M):
        w = torch.cat([weights[f"{block}.{k}"][1][m] for k in keys])
        torch.testing.assert_close(out[m], x.view(M, 2, -1)[m] @ w.T + layer.base.bias)


def test_member_weights_skip_unadapted_parts() -> None:
    model = _lora("timm_vit", targets=["q", "v"], last_blocks=1)
    assert sorted(model.member_weights()) == ["1.q", "1.v"]


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_head_gives_member_outputs_through_one_head(family: str) -> None:
    model = _lora(family, head="shared")
    _randomise(model)
    x = tiny_inputs(family, B)
    logits = model(x)
    assert logits.shape == (M, B, C)
    assert sum(p.numel() for p in model.head.parameters()) == C * (model.backbone.feature_dim + 1)
    features = model.backbone(repeat_members(x, M)).view(M, B, -1)
    head = model.head.linear
    torch.testing.assert_close(logits, features @ head.weight[0].T + head.bias[0])
    assert not torch.allclose(logits[0], logits[1])


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_training_variants(family: str) -> None:
    lora_only = _trainable(_lora(family))
    assert all(n.endswith((".A", ".B")) or n.startswith("head.") for n in lora_only)
    embedding = _trainable(_lora(family, train_backbone="embedding")) - lora_only
    marker = {"timm_vit": "patch_embed", "torchvision_vit": "conv_proj", "hf_bert": "embeddings"}
    assert embedding and all(marker[family] in n for n in embedding)
    full = _lora(family, train_backbone="all")
    assert _trainable(full) == {n for n, _ in full.named_parameters()}


def test_mlp_targets_and_high_rank_single_network() -> None:
    with_mlp = _lora("timm_vit", targets=["q", "k", "v", "o", "mlp"])
    assert any(n.endswith("mlp.fc1") for n in with_mlp.lora_modules)
    single = _lora("timm_vit", num_members=1)
    assert single(tiny_inputs("timm_vit", B)).shape == (1, B, C)


@pytest.mark.parametrize(
    ("init", "kwargs"),
    [("normal", {"std": 0.5}), ("xavier_uniform", {"gain": 3.0}), ("kaiming_uniform", {})],
)
def test_init_options_reach_the_factors(init: str, kwargs: dict[str, float]) -> None:
    model = _lora("timm_vit", init=init, **kwargs)
    a = torch.cat([layer.A.flatten() for layer in lora_layers(model).values()])
    if init == "normal":
        assert abs(a.std().item() - 0.5) < 0.05
    elif init == "kaiming_uniform":
        # PEFT's lora_A = nn.Linear(D_in, R) default init: bound 1 / sqrt(D_in), D_in = 16
        assert a.abs().max().item() <= 16**-0.5 and a.abs().max().item() > 0.8 * 16**-0.5
    else:
        # Xavier bound gain * sqrt(6 / (fan_in + fan_out)) for A (R=2, D_in=16): fan 18.
        bound = 3.0 * (6 / 18) ** 0.5
        assert a.abs().max().item() <= bound and a.abs().max().item() > 0.8 * bound


def test_unknown_head_and_backbone_training_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="head"):
        _lora("timm_vit", head="mean")
    with pytest.raises(ConfigError, match="train_backbone"):
        _lora("timm_vit", train_backbone="some")


def test_kaiming_uniform_is_what_an_nn_linear_starts_from() -> None:
    """PEFT's ``lora_A`` is an ``nn.Linear(D_in, R)`` reset with ``kaiming_uniform_(a=sqrt(5))``,
    the same draw as ``nn.Linear``'s own weight init: from one seed the factors agree."""
    from lorae.lora.layers import init_lora_a

    a = torch.empty(1, 4, 16)
    torch.manual_seed(7)
    init_lora_a(a, "kaiming_uniform", gain=10.0, std=0.02)
    torch.manual_seed(7)
    linear = nn.Linear(16, 4, bias=False)
    torch.testing.assert_close(a[0], linear.weight.detach())
