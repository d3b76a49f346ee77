"""FiLM-Ensemble (paper appendix V, Tab. 23): every LayerNorm affine is member-specific and
trains, the rest is frozen and shared; the Tab. 23 configs (CIFAR-10, M = 1, 2, 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lorae.cli.compose import load_composed
from lorae.methods import FiLMEnsemble, MemberLayerNorm
from tests.fixtures.models import TINY_BACKBONES, tiny_inputs

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "cifar10"


def test_all_affines_are_per_member_trainable_and_start_apart() -> None:
    """Our reading of "fixing all affine parameters for each ensemble member": each member owns
    every LayerNorm's scale and shift (trained), starting slightly apart; nothing else trains
    but the heads."""
    name, overrides = TINY_BACKBONES["timm_vit"]
    torch.manual_seed(0)
    film = FiLMEnsemble(
        3, name, num_members=2, init_std=0.05, pretrained=False, backbone_overrides=overrides
    )
    norms = [m for m in film.backbone.modules() if isinstance(m, MemberLayerNorm)]
    assert norms and not any(isinstance(m, nn.LayerNorm) for m in film.backbone.modules())
    for norm in norms:
        assert norm.weight.requires_grad and norm.bias.requires_grad
        assert norm.weight.shape[0] == 2 and not torch.equal(norm.weight[0], norm.weight[1])
        spread = (norm.weight[0] - norm.weight[1]).abs().max()
        assert 0 < float(spread) < 1.0  # "slight initial variations"
    trainable = {n for n, p in film.named_parameters() if p.requires_grad}
    assert all(".weight" in n or ".bias" in n for n in trainable)
    assert all(
        isinstance(film.get_submodule(n.rpartition(".")[0]), MemberLayerNorm)
        or n.startswith("head.")
        for n in trainable
    )
    logits = film.eval()(tiny_inputs("timm_vit", 2))
    assert logits.shape == (2, 2, 3) and not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("members", [1, 2, 4])
def test_tab23_configs(members: int) -> None:
    config = load_composed(CONFIGS / f"film_ensemble_m{members}.yaml")
    method = config["model"]["method"]
    assert method["class_path"] == "lorae.methods.FiLMEnsemble"
    assert method["init_args"]["num_members"] == members
    assert method["init_args"]["backbone"] == "vit_b_32"
    assert config["data"]["class_path"] == "lorae.data.CIFAR10DataModule"
