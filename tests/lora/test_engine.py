"""The engine tests of DESIGN section 4, for every backbone family, on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch

from lorae.backbones import create_backbone
from lorae.errors import ConfigError
from lorae.lora import LoRAEnsembleLinear, LoRASpec, inject_lora, lora_layers
from lorae.methods import LoRAEnsemble, SingleNetwork, repeat_members
from tests.fixtures.models import FAMILIES, TINY_BACKBONES, tiny_inputs

M, B, C = 3, 4, 5
SPEC = LoRASpec(rank=2)


def _lora_ensemble(
    family: str, num_members: int = M, seed: int = 0, lora: LoRASpec = SPEC, **kwargs: object
) -> LoRAEnsemble:
    name, overrides = TINY_BACKBONES[family]
    torch.manual_seed(seed)
    return LoRAEnsemble(
        C,
        name,
        num_members=num_members,
        pretrained=False,
        backbone_overrides=overrides,
        lora=lora,
        **kwargs,  # type: ignore[arg-type]
    ).eval()


def _randomise_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every B a non-zero value so members really differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.B.copy_(torch.randn(layer.B.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_b_equals_untouched_backbone(family: str) -> None:
    name, overrides = TINY_BACKBONES[family]
    torch.manual_seed(0)
    backbone = create_backbone(name, False, overrides).eval()
    reference = copy.deepcopy(backbone)
    wrapped = inject_lora(backbone.model, backbone.family, SPEC, num_members=M)
    assert wrapped, "something must have been injected"
    x = tiny_inputs(family, B)
    with torch.no_grad():
        expected = reference(x).repeat(M, 1)
        actual = backbone(repeat_members(x, M))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_output_shape_and_default_targets(family: str) -> None:
    model = _lora_ensemble(family)
    assert model(tiny_inputs(family, B)).shape == (M, B, C)
    # Two blocks, attention q, k, v, o: fused families wrap qkv + proj, BERT four linears.
    expected = 4 if family != "hf_bert" else 8
    assert len(model.lora_modules) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_members_equal_loop_of_single_member_models(family: str) -> None:
    ensemble = _lora_ensemble(family)
    _randomise_lora(ensemble)
    x = tiny_inputs(family, B)
    with torch.no_grad():
        batched = ensemble(x)
    ensemble_layers = lora_layers(ensemble)
    for m in range(M):
        single = _lora_ensemble(family, num_members=1)  # same seed: same backbone weights
        with torch.no_grad():
            for name, layer in lora_layers(single).items():
                layer.A.copy_(ensemble_layers[name].A[m : m + 1])
                layer.B.copy_(ensemble_layers[name].B[m : m + 1])
            single.head.weight.copy_(ensemble.head.weight[m : m + 1])
            single.head.bias.copy_(ensemble.head.bias[m : m + 1])
            looped = single(x)[0]
        torch.testing.assert_close(batched[m], looped, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1]), "members must differ"


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_reaches_only_the_member_it_comes_from(family: str) -> None:
    model = _lora_ensemble(family)
    _randomise_lora(model)
    member = 1
    model(tiny_inputs(family, B))[member].pow(2).sum().backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, f"frozen {name} received a gradient"
            continue
        assert param.grad is not None, name
        others = [i for i in range(M) if i != member]
        assert torch.count_nonzero(param.grad[others]) == 0, f"{name} leaks to other members"
        assert torch.count_nonzero(param.grad[member]) > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("family", FAMILIES)
def test_only_lora_and_heads_train_and_frozen_weights_stay_bit_identical(family: str) -> None:
    model = _lora_ensemble(family).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    assert all(n.endswith((".A", ".B")) or n.startswith("head.") for n in trainable), trainable
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    target = torch.randint(0, C, (B,))
    logits = model(tiny_inputs(family, B))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.repeat(M)).backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"frozen {name} changed"
    changed = [
        n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    assert any(n.endswith(".B") for n in changed) and any(n.startswith("head") for n in changed)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_targets_and_last_blocks(family: str) -> None:
    name, overrides = TINY_BACKBONES[family]
    backbone = create_backbone(name, False, overrides)
    spec = LoRASpec(rank=2, targets=("v", "mlp"), last_blocks=1)
    wrapped = inject_lora(backbone.model, backbone.family, spec, num_members=2)
    # Only block 1 of 2; v (fused qkv, or BERT's value) plus the two MLP linears.
    assert len(wrapped) == 3, wrapped
    assert all(("1" in w.split(".")) or w.split(".")[2].endswith("_1") for w in wrapped), wrapped
    assert all(isinstance(backbone.model.get_submodule(w), LoRAEnsembleLinear) for w in wrapped)


def test_only_value_target_in_fused_layer_touches_only_value_slice() -> None:
    model = _lora_ensemble("timm_vit", lora=LoRASpec(rank=2, targets=("v",)))
    layer = lora_layers(model)["backbone.model.blocks.0.attn.qkv"]
    assert layer.B.shape[1] == 1
    _randomise_lora(model)
    delta = layer.delta_weight()  # (M, 3D, D)
    d = delta.shape[1] // 3
    assert (
        torch.count_nonzero(delta[:, : 2 * d]) == 0 and torch.count_nonzero(delta[:, 2 * d :]) > 0
    )


def test_single_member_is_single_network_with_lora() -> None:
    model = _lora_ensemble("timm_vit", num_members=1)
    assert model(tiny_inputs("timm_vit", B)).shape == (1, B, C)


def test_single_network_trains_everything() -> None:
    name, overrides = TINY_BACKBONES["timm_vit"]
    model = SingleNetwork(C, name, pretrained=False, backbone_overrides=overrides)
    assert all(p.requires_grad for p in model.parameters())
    assert model(tiny_inputs("timm_vit", B)).shape == (1, B, C)
    assert model.identity() == {
        "method": "SingleNetwork",
        "num_members": 1,
        "num_classes": C,
        "backbone": name,
        "backbone_overrides": dict(overrides),
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"targets": ("q", "x")}, "targets"), ({"last_blocks": 0}, "last_blocks")],
)
def test_invalid_injection_options(kwargs: dict[str, object], match: str) -> None:
    backbone = create_backbone(
        *TINY_BACKBONES["timm_vit"][:1], False, TINY_BACKBONES["timm_vit"][1]
    )
    with pytest.raises(ConfigError, match=match):
        inject_lora(backbone.model, "timm_vit", LoRASpec(rank=2, **kwargs), 2)  # type: ignore[arg-type]


def test_unknown_family_and_no_targets() -> None:
    with pytest.raises(ConfigError, match="Unknown backbone family"):
        inject_lora(torch.nn.Linear(2, 2), "resnet", SPEC, num_members=2)
    with pytest.raises(ConfigError, match="No LoRA target"):
        inject_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), "timm_vit", SPEC, num_members=2)


def test_state_dict_round_trip() -> None:
    model = _lora_ensemble("torchvision_vit")
    _randomise_lora(model)
    clone = _lora_ensemble("torchvision_vit", seed=5)
    clone.load_state_dict(model.state_dict())
    x = tiny_inputs("torchvision_vit", B)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
