"""The method contract for every method on tiny backbones, and the formula of each method."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lorae.backbones import create_backbone
from lorae.backbones.base import Backbone, Inputs
from lorae.errors import ConfigError
from lorae.lora import LoRASpec
from lorae.methods import (
    METHODS,
    BackboneMethod,
    BatchEnsembleLinear,
    BayesLoRA,
    EnsembleMethod,
    ExplicitEnsemble,
    FiLMEnsemble,
    LoRAEnsemble,
    MCDropout,
    MemberLayerNorm,
    SnapshotEnsemble,
    method_class,
    register_method,
    repeat_members,
)
from lorae.methods import base as methods_base
from lorae.methods.explicit import resolve_vectorize
from lorae.methods.mc_dropout import set_dropout
from tests.fixtures.models import FAMILIES, TINY_BACKBONES, tiny_inputs

M, B, C = 3, 4, 5


TINY_LORA = LoRASpec(rank=2)

#: Test case -> (registered method name, its tiny options). Every registered method needs a
#: case (:func:`test_every_registered_method_has_a_case`); variants get cases of their own.
CASES: dict[str, tuple[str, dict[str, object]]] = {
    "lora_ensemble": ("lora_ensemble", {"num_members": M, "lora": TINY_LORA}),
    "explicit_ensemble": ("explicit_ensemble", {"num_members": M}),
    "mc_dropout": ("mc_dropout", {"num_members": M}),
    "batch_ensemble": ("batch_ensemble", {"num_members": M}),
    "batch_ensemble_pp": ("batch_ensemble", {"num_members": M, "variant": "additive"}),
    "film_ensemble": ("film_ensemble", {"num_members": M}),
    "snapshot_ensemble": ("snapshot_ensemble", {"num_members": M, "lora": TINY_LORA}),
    "bayes_lora": ("bayes_lora", {"num_members": M, "lora": TINY_LORA}),
    "single_network": ("single_network", {}),
}


def build(kind: str, family: str, seed: int = 0, **kwargs: object) -> EnsembleMethod:
    """The tiny method of case ``kind`` on ``family``'s random backbone, in eval mode."""
    name, overrides = TINY_BACKBONES[family]
    torch.manual_seed(seed)
    method, options = CASES[kind]
    common = {"pretrained": False, "backbone_overrides": overrides}
    model = METHODS[method](C, name, **options, **common, **kwargs)  # type: ignore[call-arg]
    if isinstance(model, SnapshotEnsemble):  # evaluation needs all M snapshots (appendix U)
        for _ in range(model.num_members):
            model.take_snapshot()
    return model.eval()


def test_every_registered_method_has_a_case() -> None:
    covered = {method for method, _ in CASES.values()}
    assert covered == set(METHODS), f"add a case for {sorted(set(METHODS) - covered)}"


# ------------------------------------------------------------------------------ registry


def test_registry_holds_every_method_class_of_the_package() -> None:
    import lorae.methods as package

    classes = {
        value
        for value in vars(package).values()
        if isinstance(value, type)
        and issubclass(value, EnsembleMethod)
        and value not in (EnsembleMethod, BackboneMethod, package.LoRANetworkMethod)
    }
    assert classes == set(METHODS.values())
    assert METHODS["lora_ensemble"] is LoRAEnsemble and METHODS["bayes_lora"] is BayesLoRA
    assert method_class("snapshot_ensemble") is SnapshotEnsemble
    with pytest.raises(ConfigError, match="lora_ensemble"):
        method_class("lora_ensembel")


def test_register_method_adds_a_class_and_refuses_a_taken_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = dict(METHODS)
    monkeypatch.setattr("lorae.methods.registry.METHODS", registry)

    @register_method("tiny_new_method")
    class TinyNewMethod(EnsembleMethod):
        pass

    assert registry["tiny_new_method"] is TinyNewMethod
    assert register_method("tiny_new_method")(TinyNewMethod) is TinyNewMethod  # idempotent
    with pytest.raises(ValueError, match="lora_ensemble"):
        register_method("lora_ensemble")(TinyNewMethod)


@pytest.mark.parametrize("kind", [k for k, (method, _) in CASES.items() if k == method])
def test_backbone_methods_share_one_identity(kind: str) -> None:
    """The prologue's identity: method, members, classes and the backbone name."""
    model = build(kind, "timm_vit")
    identity = model.identity()
    assert identity["method"] == type(model).__name__
    assert identity["backbone"] == TINY_BACKBONES["timm_vit"][0]
    assert identity["num_members"] == model.num_members and identity["num_classes"] == C
    if "lora" in CASES[kind][1]:
        assert identity["rank"] == 2


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------ contract


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", CASES)
def test_every_method_returns_member_logits(kind: str, family: str) -> None:
    model = build(kind, family)
    members = CASES[kind][1].get("num_members", 1)
    x = tiny_inputs(family, B)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (members, B, C)
    assert torch.isfinite(logits).all()
    assert model.num_members == members and model.num_classes == C
    model.train()
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


TRAINABLE: dict[str, Callable[[str], bool]] = {
    "lora_ensemble": lambda n: n.endswith((".A", ".B")) or n.startswith("head."),
    "snapshot_ensemble": lambda n: n.endswith((".A", ".B")) or n.startswith("network.head."),
    "bayes_lora": lambda n: n.endswith((".A", ".B")) or n.startswith("network.head."),
    "film_ensemble": lambda n: (
        n.startswith("head.") or (n.endswith((".weight", ".bias")) and "norm" in n)
    ),
}


@pytest.mark.parametrize(
    "kind", ["lora_ensemble", "snapshot_ensemble", "bayes_lora", "film_ensemble"]
)
def test_adapter_methods_train_only_their_parameters(kind: str) -> None:
    model = build(kind, "timm_vit")
    names = trainable(model)
    assert names and all(TRAINABLE[kind](n) for n in names), sorted(names)
    frozen = {n for n, _ in model.named_parameters()} - names
    assert any("mlp.fc1" in n for n in frozen)


@pytest.mark.parametrize("kind", ["explicit_ensemble", "mc_dropout"])
def test_full_finetuning_methods_train_everything(kind: str) -> None:
    model = build(kind, "torchvision_vit")
    assert trainable(model) == {n for n, _ in model.named_parameters()}


def test_film_trains_exactly_the_layernorm_affines_and_heads() -> None:
    model = build("film_ensemble", "timm_vit")
    norms = [m for m in model.modules() if isinstance(m, MemberLayerNorm)]
    # tiny timm ViT: norm1 + norm2 in each of 2 blocks, and the final norm
    assert len(norms) == 5
    expected = {id(p) for m in norms for p in (m.weight, m.bias)}
    expected |= {id(p) for p in model.head.parameters()}  # type: ignore[union-attr]
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected


# ------------------------------------------------------------------------- BatchEnsemble


@pytest.mark.parametrize("variant", ["multiplicative", "additive"])
def test_batch_ensemble_layer_equals_its_formula(variant: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 9)
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    layer = BatchEnsembleLinear(base, 3, M, variant, 0.3)  # type: ignore[arg-type]
    x = torch.randn(M * 2, 5, 6)
    out = layer(x).view(M, 2, 5, 9)
    for i in range(M):
        r, s = layer.r[i].reshape(-1), layer.s[i]  # r (9,), s (3 parts, 6)
        # W_i row o (in part p = o // 3): W[o] * r[o] * s[p]  or  W[o] + r[o] * s[p]
        s_rows = s.repeat_interleave(3, dim=0)  # (9, 6)
        if variant == "multiplicative":
            w_i = weight * r[:, None] * s_rows
        else:
            w_i = weight + r[:, None] * s_rows
        torch.testing.assert_close(layer.member_weight()[i], w_i)
        torch.testing.assert_close(out[i], x.view(M, 2, 5, 6)[i] @ w_i.T + bias)


@pytest.mark.parametrize("variant", ["multiplicative", "additive"])
def test_batch_ensemble_init_and_trainable(variant: str) -> None:
    model = build(
        "batch_ensemble" if variant == "multiplicative" else "batch_ensemble_pp", "hf_bert"
    )
    layers = [m for m in model.modules() if isinstance(m, BatchEnsembleLinear)]
    assert len(layers) == 8  # q, k, v, o in 2 blocks
    # the drawn moments (mean 1 or 0, variance 0.02) are tested in test_batch_ensemble.py
    names = trainable(model)
    shared = {n for n in names if n.endswith(("base.weight", "base.bias"))}
    assert len(shared) == 16
    assert all(n.endswith((".r", ".s")) or n.startswith("head.") for n in names - shared)
    weights = model.member_weights()
    assert len(weights) == 8 and weights["1.o"][1].shape == (M, 16, 16)


# ---------------------------------------------------------------------------- MC Dropout


@pytest.mark.parametrize("family", FAMILIES)
def test_mc_dropout_members_differ_through_dropout_alone(family: str) -> None:
    """``variant: dropout`` (DropKey, the default, is tested in test_mc_dropout.py)."""
    model = build("mc_dropout", family, head="shared", variant="dropout")
    x = tiny_inputs(family, B)
    with torch.no_grad():
        logits = model(x)
        assert not model.training
        for i in range(1, M):
            assert not torch.allclose(logits[0], logits[i])
        # One head: without dropout all members would be the same network.
        set_dropout(model, 0.0)
        deterministic = model(x)
    for i in range(1, M):
        torch.testing.assert_close(deterministic[0], deterministic[i])


def test_mc_dropout_sets_the_probability_everywhere() -> None:
    model = build("mc_dropout", "torchvision_vit", dropout=0.3, variant="dropout")
    probabilities = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert probabilities and set(probabilities) == {0.3}


class _NoDropout(Backbone):
    def forward(self, x: Inputs) -> torch.Tensor:
        assert isinstance(x, torch.Tensor)
        return self.model(x.flatten(1))


def test_mc_dropout_without_dropout_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dropout_backbone(*args: object) -> Backbone:
        return _NoDropout(nn.Linear(3 * 16 * 16, 8), "timm_vit", 8)

    monkeypatch.setattr(methods_base, "create_backbone", no_dropout_backbone)  # the prologue
    with pytest.raises(ConfigError, match="no dropout"):
        MCDropout(C, "anything", pretrained=False, variant="dropout")
    with pytest.raises(ConfigError, match="dropout probability"):
        build("mc_dropout", "timm_vit", dropout=0.0)


# ---------------------------------------------------------------------------------- FiLM


def _set_norms(backbone: Backbone, film: FiLMEnsemble, member: int) -> None:
    """Give a plain backbone member ``member``'s LayerNorm affine parameters."""
    film_norms = {n: m for n, m in film.backbone.named_modules() if isinstance(m, MemberLayerNorm)}
    with torch.no_grad():
        for name, module in backbone.named_modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(film_norms[name].weight[member])
                module.bias.copy_(film_norms[name].bias[member])


@pytest.mark.parametrize("family", FAMILIES)
def test_film_members_differ_only_in_layernorm_affines(family: str) -> None:
    film = build("film_ensemble", family)
    assert isinstance(film, FiLMEnsemble)
    x = tiny_inputs(family, B)
    with torch.no_grad():
        features = film.backbone(repeat_members(x, M)).view(M, B, -1)
    name, overrides = TINY_BACKBONES[family]
    torch.manual_seed(0)
    plain = create_backbone(name, False, overrides).eval()
    for i in range(M):
        _set_norms(plain, film, i)
        with torch.no_grad():
            torch.testing.assert_close(features[i], plain(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(features[0], features[1])


# ---------------------------------------------------------------------- Explicit Ensemble


@pytest.mark.parametrize("family", FAMILIES)
def test_explicit_vmap_equals_loop(family: str) -> None:
    model = build("explicit_ensemble", family, noise_alpha=0.5)
    assert isinstance(model, ExplicitEnsemble)
    x = tiny_inputs(family, B)
    results = {}
    for mode in ("vmap", "loop"):
        model.zero_grad()
        model.vectorize = mode  # type: ignore[assignment]
        logits = model(x)
        (logits * torch.arange(C)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
        results[mode] = (logits.detach(), grads)
    torch.testing.assert_close(results["vmap"][0], results["loop"][0], rtol=1e-5, atol=1e-5)
    for name, grad in results["vmap"][1].items():
        torch.testing.assert_close(grad, results["loop"][1][name], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(results["loop"][0][0], results["loop"][0][1])


def test_explicit_auto_trains_with_the_loop_on_cuda_only() -> None:
    """vmap over CUDA's fused attention fails in backward (seen on an H200), after the
    forward's fallback check: "auto" must pick the loop there, and keep vmap elsewhere."""
    assert resolve_vectorize("auto", "cuda", grad_enabled=True) == "loop"
    assert resolve_vectorize("auto", "cuda", grad_enabled=False) == "auto"
    assert resolve_vectorize("auto", "cpu", grad_enabled=True) == "auto"
    assert resolve_vectorize("vmap", "cuda", grad_enabled=True) == "vmap"
    assert resolve_vectorize("loop", "cpu", grad_enabled=False) == "loop"


def test_explicit_members_are_independent_copies_of_the_pretrained_backbone() -> None:
    model = build("explicit_ensemble", "timm_vit")
    x = tiny_inputs("timm_vit", B)
    name, overrides = TINY_BACKBONES["timm_vit"]
    torch.manual_seed(0)
    plain = create_backbone(name, False, overrides).eval()
    assert isinstance(model, ExplicitEnsemble)
    with torch.no_grad():
        features = model._features(x, "loop")
        for i in range(M):
            torch.testing.assert_close(features[i], plain(x))
    model.train()
    model(x)[1].sum().backward()
    qkv = model.members.get_parameter("model.blocks.0.attn.qkv.weight")
    assert qkv.grad is not None
    assert qkv.grad[1].abs().sum() > 0
    assert qkv.grad[0].abs().sum() == 0 and qkv.grad[2].abs().sum() == 0
    weights = model.member_weights()
    torch.testing.assert_close(weights["1.v"][0], plain.model.blocks[1].attn.qkv.weight[32:])
    torch.testing.assert_close(weights["1.v"][1][2], plain.model.blocks[1].attn.qkv.weight[32:])


def test_explicit_weight_noise_on_last_blocks_only() -> None:
    alpha = 0.5
    model = build("explicit_ensemble", "timm_vit", noise_alpha=alpha, noise_blocks=1)
    name, overrides = TINY_BACKBONES["timm_vit"]
    torch.manual_seed(0)
    plain = create_backbone(name, False, overrides)
    assert isinstance(model, ExplicitEnsemble)
    first = model.members.get_parameter("model.blocks.0.mlp.fc1.weight")
    torch.testing.assert_close(first, plain.model.blocks[0].mlp.fc1.weight.expand_as(first))
    last = model.members.get_parameter("model.blocks.1.mlp.fc1.weight")
    original = plain.model.blocks[1].mlp.fc1.weight
    noise = last - original
    assert abs(noise.std().item() / (alpha * original.std().item()) - 1) < 0.1
    assert not torch.allclose(noise[0], noise[1])
    qkv = model.members.get_parameter("model.blocks.1.attn.qkv.weight")
    assert not torch.allclose(qkv[0], plain.model.blocks[1].attn.qkv.weight)
    norm = model.members.get_parameter("model.blocks.1.norm1.weight")
    torch.testing.assert_close(norm, plain.model.blocks[1].norm1.weight.expand_as(norm))


def test_explicit_state_dict_round_trip() -> None:
    model = build("explicit_ensemble", "torchvision_vit")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    clone = build("explicit_ensemble", "torchvision_vit", seed=3)
    clone.load_state_dict(model.state_dict())
    x = tiny_inputs("torchvision_vit", B)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))
