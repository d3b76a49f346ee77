"""LoRA-Ensemble's execution paths (issue 6) give the plain path's results: member chunks, the
shared trunk, the head-only ensemble (``last_blocks: 0``), ``torch.compile``, bf16 autocast
and the in-place inference delta."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from lorae.backbones import create_backbone
from lorae.errors import ConfigError
from lorae.lora import (
    LoRAEnsembleFusedLinear,
    LoRAEnsembleLinear,
    LoRASpec,
    inject_lora,
    lora_layers,
)
from lorae.lora import chunks as chunks_module
from lorae.lora.chunks import auto_chunk_size, member_chunks, member_factors
from lorae.lora.trunk import transformer_blocks
from lorae.methods import LoRAEnsemble, repeat_members
from tests.fixtures.models import FAMILIES, TINY_BACKBONES, tiny_inputs

M, B, C = 4, 3, 5
#: BERT's dropout off, so train mode is deterministic (the tiny ViTs have none).
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


SPEC = LoRASpec(rank=2)
#: Architecture override of the number of transformer blocks, per family.
DEPTH = {"timm_vit": "depth", "torchvision_vit": "num_layers", "hf_bert": "num_hidden_layers"}


def _model(
    family: str, seed: int = 0, depth: int = 2, last_blocks: int | None = None, **kwargs: Any
) -> LoRAEnsemble:
    name, overrides = TINY_BACKBONES[family]
    overrides = {**overrides, DEPTH[family]: depth}
    if family == "hf_bert":
        overrides = {**overrides, **NO_DROPOUT}
    torch.manual_seed(seed)
    model = LoRAEnsemble(
        C,
        name,
        num_members=M,
        lora=LoRASpec(rank=2, last_blocks=last_blocks),
        pretrained=False,
        backbone_overrides=overrides,
        **kwargs,
    )
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero B: members really differ
        for layer in lora_layers(model).values():
            layer.B.copy_(torch.randn(layer.B.shape, generator=generator) * 0.3)
    return model.eval()


def _plain(model: LoRAEnsemble, x: Any) -> Tensor:
    """The unshared, unchunked computation: every member's rows through the whole backbone."""
    return model.head(model.backbone(repeat_members(x, model.num_members)))


def _grads(model: nn.Module, logits: Tensor) -> dict[str, Tensor]:
    """Gradients of a loss that weighs every member and class differently."""
    model.zero_grad()
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    (logits * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Equal up to float32 summation order, relative to the largest gradient (some, such as
    BERT's key bias, are zero in exact arithmetic and pure rounding noise here)."""
    assert sorted(actual) == sorted(expected)
    scale = max(g.abs().max().item() for g in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def _count_calls(module: nn.Module, rows: list[int]) -> None:
    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        first = args[0] if args else next(iter(kwargs.values()))
        rows.append(int(first.shape[0]))

    module.register_forward_pre_hook(hook, with_kwargs=True)


# --- member chunks -------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, "auto"])
def test_chunks_equal_one_batch_in_outputs_and_gradients(
    chunk_size: int | str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A row budget of 6 makes "auto" choose chunks of 6 // B = 2 members here.
    monkeypatch.setitem(chunks_module.ROW_BUDGET, "cpu", 6)
    model = _model("timm_vit", member_chunk_size=None)
    x = tiny_inputs("timm_vit", B)
    expected = model(x)
    expected_grads = _grads(model, expected)
    model.member_chunk_size = chunk_size  # type: ignore[assignment]
    calls: list[int] = []
    _count_calls(model.backbone.model, calls)
    actual = model(x)
    k = {1: 1, 3: 3, "auto": 2}[chunk_size]
    assert calls == [k * B] * (M // k) + ([(M % k) * B] if M % k else [])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    grads = _grads(model, actual)
    assert any(n.endswith(".A") for n in grads) and any(n.endswith(".B") for n in grads)
    assert "head.weight" in grads
    _assert_same_grads(grads, expected_grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunks_equal_one_batch_for_every_family(family: str) -> None:
    model = _model(family, member_chunk_size=3)
    x = tiny_inputs(family, B)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _plain(model, x), rtol=1e-5, atol=1e-6)


def test_auto_chunk_size_follows_the_row_budget() -> None:
    cpu = torch.device("cpu")
    budget = chunks_module.ROW_BUDGET["cpu"]
    assert auto_chunk_size(16, 1, cpu) == min(16, budget)  # small batch: one big batch
    assert auto_chunk_size(16, budget, cpu) == 1  # a batch of the budget: member by member
    assert auto_chunk_size(16, 10 * budget, cpu) == 1  # never fewer than one member
    assert auto_chunk_size(16, 2, torch.device("cuda")) == 16
    windows = member_chunks(5, 1, 2, cpu)
    assert windows == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert member_chunks(5, 1, None, cpu) == [slice(0, 5)]


@pytest.mark.parametrize("value", [0, -1, "big", 2.5, True])
def test_invalid_chunk_size_is_a_config_error(value: object) -> None:
    with pytest.raises(ConfigError, match="member_chunk_size"):
        _model("timm_vit", member_chunk_size=value)


def test_member_factors_run_a_slice_of_the_members() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(LoRAEnsembleFusedLinear(nn.Linear(8, 24), "qkv", ("q", "v"), M, SPEC))
    layer = model[0]
    with torch.no_grad():
        layer.B.normal_()
        x = torch.randn(B, 5, 8)
        full = model(repeat_members(x, M)).view(M, B, 5, 24)
        factors = member_factors({"0": layer}, slice(1, 3))
        part = functional_call(model, factors, (repeat_members(x, 2),)).view(2, B, 5, 24)
    assert factors["0.A"].data_ptr() == layer.A[1].data_ptr()  # a view, not a copy
    torch.testing.assert_close(part, full[1:3])


# --- the in-place inference delta ----------------------------------------------------------


@pytest.mark.parametrize("enabled", [None, ("q", "k", "v"), ("k",), ("q", "v")])
def test_in_place_inference_delta_equals_the_autograd_path(
    enabled: tuple[str, ...] | None,
) -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 24)
    layer = (
        LoRAEnsembleLinear(base, M, SPEC)
        if enabled is None
        else LoRAEnsembleFusedLinear(base, "qkv", enabled, M, SPEC)
    )
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(M * B, 5, 8)
    recorded = layer(x)
    assert recorded.requires_grad
    with torch.no_grad():
        in_place = layer(x)
    torch.testing.assert_close(in_place, recorded.detach(), rtol=1e-6, atol=1e-6)
    # Independent reference: each member's adapted weight W_0 + scale * B_i A_i.
    weights = base.weight + layer.delta_weight().detach()
    expected = torch.einsum("mnd,mod->mno", x.view(M, -1, 8), weights) + base.bias
    torch.testing.assert_close(in_place.view(M, -1, 24), expected, rtol=1e-5, atol=1e-5)


# --- shared trunk --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("train", [False, True])
def test_shared_trunk_equals_the_unshared_computation(
    family: str, chunk_size: int | None, train: bool
) -> None:
    # Three blocks, LoRA in the last: the trunk is blocks 0 and 1.
    model = _model(family, depth=3, last_blocks=1, member_chunk_size=chunk_size).train(train)
    x = tiny_inputs(family, B)
    blocks = transformer_blocks(model.backbone.model, family)
    rows: list[list[int]] = [[], [], []]
    for block, seen in zip(blocks, rows, strict=True):
        _count_calls(next(block.children()), seen)  # a submodule: runs only when computed
    with torch.no_grad():
        expected = _plain(model, x)
        assert rows == [[M * B]] * 3  # unshared: every block on M*B rows
        for seen in rows:
            seen.clear()
        actual = model(x)
    # The trunk runs once on the B samples, whatever the number of chunks; the adapted block
    # runs once per chunk on the chunk's rows.
    assert rows[:2] == [[B], [B]]
    assert rows[2] == ([M * B] if chunk_size is None else [3 * B, (M - 3) * B])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_trunk_gradients_reach_a_trainable_trunk(family: str) -> None:
    model = _model(family, depth=3, last_blocks=1, member_chunk_size=3, train_backbone="all")
    x = tiny_inputs(family, B)
    expected = _grads(model, _plain(model, x))
    actual = _grads(model, model(x))
    trunk = [n for n in expected if re.search(r"(blocks\.|encoder_layer_|layer\.)[01]\.", n)]
    assert trunk, "the trunk blocks' pretrained weights must receive gradients"
    _assert_same_grads(actual, expected)


def test_a_deep_copy_shares_its_own_trunk() -> None:
    model = _model("timm_vit", depth=3, last_blocks=1, member_chunk_size=3)
    clone = copy.deepcopy(model)
    x = tiny_inputs("timm_vit", B)
    with torch.no_grad():
        clone.backbone.model.blocks[0].attn.qkv.weight.mul_(2)  # the copy now differs
        torch.testing.assert_close(clone(x), _plain(clone, x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), _plain(model, x), rtol=1e-5, atol=1e-6)


def test_block_module_patterns_find_every_block() -> None:
    for family in FAMILIES:
        model = _model(family)
        assert len(transformer_blocks(model.backbone.model, family)) == 2


# --- last_blocks: 0, the head-only ensemble ------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_head_only_ensemble_trains_only_heads_and_runs_the_backbone_once(family: str) -> None:
    model = _model(family, last_blocks=0)
    assert not lora_layers(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    calls: list[int] = []
    _count_calls(model.backbone.model, calls)
    x = tiny_inputs(family, B)
    logits = model(x)
    assert calls == [B]
    assert logits.shape == (M, B, C)
    with torch.no_grad():
        features = model.backbone(x)
    for m in range(M):
        expected = features @ model.head.weight[m].T + model.head.bias[m]
        torch.testing.assert_close(logits[m], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits[0], logits[1])
    with pytest.raises(ConfigError, match="member-specific"):
        model.member_weights()


def test_head_only_ensemble_rejects_a_shared_head_and_negative_blocks() -> None:
    with pytest.raises(ConfigError, match="head: member"):
        _model("timm_vit", last_blocks=0, head="shared")
    with pytest.raises(ConfigError, match="last_blocks"):
        _model("timm_vit", last_blocks=-1)
    name, overrides = TINY_BACKBONES["timm_vit"]
    model = create_backbone(name, False, overrides).model
    with pytest.raises(ConfigError, match="last_blocks"):
        inject_lora(model, "timm_vit", LoRASpec(rank=2, last_blocks=0), num_members=2)


# --- torch.compile and bf16 ----------------------------------------------------------------


def test_compile_keeps_checkpoint_keys_and_identity() -> None:
    plain = _model("timm_vit", last_blocks=1)
    compiled = _model("timm_vit", last_blocks=1, compile=True)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert compiled.identity() == plain.identity()
    compiled.load_state_dict(plain.state_dict())


@pytest.mark.slow  # compiling even a tiny ViT takes about a minute on 2 cores
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_compiled_backbone_equals_plain(chunk_size: int | None) -> None:
    plain = _model("timm_vit", last_blocks=1, member_chunk_size=chunk_size)
    compiled = _model("timm_vit", last_blocks=1, member_chunk_size=chunk_size, compile=True)
    x = tiny_inputs("timm_vit", B)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["timm_vit", "hf_bert"])
def test_bf16_autocast_agrees_with_float32(family: str) -> None:
    model = _model(family, last_blocks=1, member_chunk_size=3)
    x = tiny_inputs(family, B)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9); through two blocks and the head
    # the error stays a few percent of the logit scale.
    scale = reference.abs().max().item()
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.05 * scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training works too
        grads = _grads(model, model(x))
    assert all(torch.isfinite(g).all() for g in grads.values())
