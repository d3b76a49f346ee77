"""``--seed_everything S`` with ``--trainer.deterministic=true``: two CPU runs are bit-identical;
another seed gives other members (and the members of one run differ from each other)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lorae.cli import main
from tests.fixtures.tiny_configs import checkpoint_callback, digits_lora_config, write_config


def trained_weights(tmp_path: Path, seed: int, name: str) -> dict[str, Tensor]:
    config = digits_lora_config(num_members=2)
    config["trainer"]["callbacks"] = [checkpoint_callback(tmp_path / name)]
    cfg = write_config(tmp_path / f"{name}.yaml", config)
    main(
        [
            "fit",
            "--config",
            str(cfg),
            f"--seed_everything={seed}",
            "--trainer.deterministic=true",
            "--trainer.max_steps=5",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path / (name + '_run')}",
        ]
    )
    checkpoint = torch.load(tmp_path / name / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 5
    state: dict[str, Tensor] = checkpoint["state_dict"]
    return state


def lora_keys(state: dict[str, Tensor]) -> list[str]:
    keys = [k for k in state if k.endswith((".A", ".B"))]
    assert keys, sorted(state)[:20]
    return keys


def test_same_seed_bit_identical_other_seed_other_members(tmp_path: Path) -> None:
    first = trained_weights(tmp_path, 5, "first")
    second = trained_weights(tmp_path, 5, "second")
    other = trained_weights(tmp_path, 6, "other")
    assert first.keys() == second.keys() == other.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), f"seed 5 twice: {key} differs"
    for key in lora_keys(first):
        assert not torch.equal(first[key], other[key]), f"seeds 5 and 6 agree on {key}"
        members = first[key]  # (M, ...): each member draws its own A (and trains its own B)
        assert not torch.equal(members[0], members[1]), f"members 0 and 1 agree on {key}"
