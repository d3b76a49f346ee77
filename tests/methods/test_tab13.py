"""Tab. 13 (paper appendix G) read from its parameter counts: every row keeps LoRA on attention;
"Cls. head" is one head shared by the members, "Ensemble cls. head" one head per member,
"+ tokenizer" the trainable patch embedding, "+ MLP" LoRA on the MLP too, "Full backbone"
every weight. The shipped ``configs/ham10000/tab13_*.yaml`` (M = 8, rank 4, 7 classes) are
built on a random ViT-B/32 (torchvision ``vit_b_32``; timm's ``vit_base_patch32_224`` counts
the same) and their trainable parameters counted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lorae.cli.compose import load_composed
from lorae.lora import LoRASpec
from lorae.methods import LoRAEnsemble

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "ham10000"
HAM10000_CLASSES = 7

#: config -> trainable parameters printed in Tab. 13.
PAPER = {
    "tab13_attention_head": 2_364_679,
    "tab13_attention_head_tokenizer": 4_724_743,
    "tab13_mlp_head": 5_313_799,
    "tab13_mlp_head_tokenizer": 7_673_863,
    "tab13_ensemble_head": 2_402_360,
}
#: The "Full backbone" row: the paper prints 90,114,055; no choice of head (shared:
#: 89,819,911, per member: 89,857,592) or embedding reproduces it (294,144 = 383 x 768 apart).
FULL_BACKBONE = ("tab13_full_backbone", 89_819_911, 90_114_055)


def _trainable(name: str) -> int:
    init_args: dict[str, Any] = dict(
        load_composed(CONFIGS / f"{name}.yaml")["model"]["method"]["init_args"]
    )
    assert init_args.pop("pretrained") is True and init_args.pop("num_members") == 8
    lora = LoRASpec(**init_args.pop("lora"))
    assert lora.rank == 4 and {"q", "k", "v", "o"} <= set(lora.targets)  # attention in every row
    with torch.device("meta"):  # counts only: no memory, no init cost
        method = LoRAEnsemble(
            HAM10000_CLASSES, num_members=8, lora=lora, pretrained=False, **init_args
        )
    return sum(p.numel() for p in method.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", PAPER)
def test_tab13_trainable_parameters_equal_the_papers(name: str) -> None:
    assert _trainable(name) == PAPER[name]


def test_tab13_full_backbone_row() -> None:
    name, ours, paper = FULL_BACKBONE
    assert _trainable(name) == ours
    assert paper - ours == 294_144  # the unexplained gap, documented in docs/methods.md
