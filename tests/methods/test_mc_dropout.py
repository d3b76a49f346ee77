"""MC Dropout as the paper compares against: DropKey (Li et al. 2023) on every family."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorae.backbones import create_backbone
from lorae.backbones.base import Backbone
from lorae.errors import ConfigError
from lorae.lora.dropkey import DROPKEY_SITES, DropKey, dropkey_bias
from lorae.methods import MCDropout
from tests.fixtures.models import FAMILIES, TINY_BACKBONES, tiny_inputs

M, B, C = 3, 4, 5


def tiny_backbone(family: str, seed: int = 0) -> Backbone:
    name, overrides = TINY_BACKBONES[family]
    torch.manual_seed(seed)
    return create_backbone(name, False, overrides).eval()


def mc_dropout(family: str, **kwargs: Any) -> MCDropout:
    name, overrides = TINY_BACKBONES[family]
    torch.manual_seed(0)
    options: dict[str, Any] = {"num_members": M, "pretrained": False, **kwargs}
    return MCDropout(C, name, backbone_overrides=overrides, **options).eval()


def first_attention(backbone: Backbone) -> nn.Module:
    site = DROPKEY_SITES[backbone.family]
    import re

    return next(m for n, m in backbone.model.named_modules() if re.fullmatch(site.pattern, n))


def reference_attention(
    family: str, module: nn.Module, x: Tensor, dropped: Tensor, padding: Tensor | None
) -> Tensor:
    """Attention written out by hand: logits ``QKᵀ/sqrt(d)``, ``-inf`` where ``dropped``
    (and on padded keys), softmax, no rescaling.

    Shape:
        x ``(N, T, D)``, dropped ``(N, H, T, T)``, padding ``(N, T)`` (1 = token) -> ``(N, T, D)``
    """
    n, t, d = x.shape
    if family == "timm_vit":
        h = module.num_heads
        q, k, v = module.qkv(x).view(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
    elif family == "torchvision_vit":
        h = module.num_heads
        qkv = F.linear(x, module.in_proj_weight, module.in_proj_bias)
        q, k, v = qkv.view(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
    else:
        h = module.num_attention_heads
        q, k, v = (
            layer(x).view(n, t, h, d // h).transpose(1, 2)
            for layer in (module.query, module.key, module.value)
        )
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
    logits = logits.masked_fill(dropped, float("-inf"))
    if padding is not None:
        logits = logits.masked_fill(padding[:, None, None, :] == 0, float("-inf"))
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, t, d)
    if family == "timm_vit":
        return module.proj(out)
    if family == "torchvision_vit":
        return module.out_proj(out)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_mask_hits_exactly_the_logits_it_says(family: str) -> None:
    backbone = tiny_backbone(family)
    dropkey = DropKey(0.3)
    dropkey.record = True
    assert len(dropkey.attach(backbone.model, backbone.family)) == 2  # both blocks
    module = first_attention(backbone)
    seen: dict[str, Tensor] = {}

    def capture(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        seen["x"], seen["out"] = x, out[0] if isinstance(out, tuple) else out

    module.register_forward_hook(capture, with_kwargs=True)
    inputs = tiny_inputs(family, B, seed=1)
    torch.manual_seed(3)
    with torch.no_grad():
        backbone(inputs)
        name, dropped = dropkey.recorded[0]
        assert module is backbone.model.get_submodule(name)
        heads = dropped.shape[1]
        tokens = seen["x"].shape[1]
        assert dropped.shape == (B, heads, tokens, tokens) and dropped.dtype == torch.bool
        assert 0 < dropped.sum() < dropped.numel()
        assert not dropped.all(dim=-1).any()  # no row fully dropped (would be NaN with -inf)
        padding = inputs["attention_mask"] if isinstance(inputs, dict) else None
        expected = reference_attention(family, module, seen["x"], dropped, padding)
        torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)
        # the check can fail: another mask, or none, gives another output
        other = reference_attention(family, module, seen["x"], dropped.transpose(-2, -1), padding)
        assert not torch.allclose(seen["out"], other, rtol=1e-5, atol=1e-5)
        plain = reference_attention(family, module, seen["x"], torch.zeros_like(dropped), padding)
        assert not torch.allclose(seen["out"], plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_p_zero_is_the_plain_backbone_bit_for_bit(family: str) -> None:
    plain, hooked = tiny_backbone(family), tiny_backbone(family)
    dropkey = DropKey(0.0)
    assert dropkey.attach(hooked.model, hooked.family)
    x = tiny_inputs(family, B)
    with torch.no_grad():
        assert torch.equal(plain(x), hooked(x))
        dropkey.p = 0.2
        assert not torch.equal(plain(x), hooked(x))
        dropkey.detach()
        assert torch.equal(plain(x), hooked(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_members_differ_through_dropkey_alone_in_eval_mode(family: str) -> None:
    model = mc_dropout(family, head="shared")
    assert model.variant == "dropkey" and model.dropkey is not None
    assert not model.backbone.training  # DropKey needs no training mode to sample
    x = tiny_inputs(family, B)
    model.dropkey.record = True
    with torch.no_grad():
        logits = model(x)
        for i in range(1, M):
            assert not torch.allclose(logits[0], logits[i])
        # each member's rows of the member-major batch (M*B, ...) drew their own masks
        _, dropped = model.dropkey.recorded[0]
        per_member = dropped.view(M, B, *dropped.shape[1:])
        for i in range(1, M):
            assert not torch.equal(per_member[0], per_member[i])
        # one head, p = 0: the members are the same network, so DropKey was the only noise
        model.dropkey.p = 0.0
        deterministic = model(x)
    for i in range(1, M):
        torch.testing.assert_close(deterministic[0], deterministic[i])


def test_dropkey_is_the_default_and_leaves_the_backbones_dropout_alone() -> None:
    model = mc_dropout("hf_bert", dropout=0.3)
    assert model.identity()["variant"] == "dropkey"
    probabilities = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    assert probabilities == {0.1}  # BERT's own rates, not 0.3
    assert model.dropkey is not None and model.dropkey.p == 0.3
    model.train()
    assert model.backbone.training
    model.eval()
    assert not model.backbone.training


def test_the_rate_of_masked_logits_is_p() -> None:
    p = 0.2
    model = mc_dropout("timm_vit", dropout=p)
    assert model.dropkey is not None
    model.dropkey.record = True
    with torch.no_grad():
        model(tiny_inputs("timm_vit", 32))
    masks = torch.cat([d.flatten() for _, d in model.dropkey.recorded])
    n = masks.numel()  # 2 blocks x 96 rows x 2 heads x 5 x 5 = 9600
    assert n == 2 * M * 32 * 2 * 5 * 5
    rate = masks.double().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)  # five binomial standard errors


def test_a_fully_dropped_row_stays_finite() -> None:
    dropped = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    dropped[0, 0, 1, 0] = False
    bias = dropkey_bias(dropped, torch.float32)
    assert bias[0, 0, 1, 0] == 0 and (bias[0, 0, 0] == torch.finfo(torch.float32).min).all()
    logits = torch.randn(1, 1, 2, 3) + bias
    weights = logits.softmax(-1)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights[0, 0, 1], torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("family", FAMILIES)
def test_dropkey_trains_under_bf16_autocast(family: str) -> None:
    model = mc_dropout(family).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tiny_inputs(family, B))
    assert logits.shape == (M, B, C) and torch.isfinite(logits).all()
    logits.float().sum().backward()


def test_variant_dropout_keeps_todays_standard_dropout() -> None:
    model = mc_dropout("torchvision_vit", variant="dropout", dropout=0.3)
    assert model.dropkey is None and model.backbone.training
    probabilities = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert probabilities and set(probabilities) == {0.3}


def test_a_backbone_without_attention_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorae.methods import base as methods_base

    class Flat(Backbone):
        def forward(self, x: Any) -> Tensor:
            return self.model(x.flatten(1))

    monkeypatch.setattr(
        methods_base, "create_backbone", lambda *a: Flat(nn.Linear(8, 8), "timm_vit", 8)
    )
    with pytest.raises(ConfigError, match="no attention module"):
        MCDropout(C, "anything", pretrained=False)
    with pytest.raises(ConfigError, match="variant"):
        MCDropout(C, "anything", pretrained=False, variant="dropkeys")  # type: ignore[arg-type]
