"""LoRASpec: the one home of the LoRA options, its defaults and its validation."""

from __future__ import annotations

import dataclasses

import pytest

from lorae.errors import ConfigError
from lorae.lora import ATTENTION, LoRASpec


def test_defaults_are_the_papers() -> None:
    spec = LoRASpec()
    assert (spec.rank, spec.alpha, spec.targets) == (8, None, ("q", "k", "v", "o"))
    assert (spec.last_blocks, spec.init, spec.gain, spec.std) == (
        None,
        "xavier_uniform",
        10.0,
        0.02,
    )
    assert spec.targets == ATTENTION
    assert spec.scale == 1.0  # alpha = rank


def test_scale_frozen_and_hashable() -> None:
    spec = LoRASpec(rank=4, alpha=8.0, targets=["q", "mlp"])  # type: ignore[arg-type]
    assert spec.scale == 2.0
    assert spec.targets == ("q", "mlp"), "a list becomes a tuple"
    assert hash(spec) == hash(LoRASpec(rank=4, alpha=8.0, targets=("q", "mlp")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rank = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 0}, "lora.rank must be an integer >= 1"),
        ({"rank": 2.5}, "lora.rank must be an integer >= 1"),
        ({"alpha": 0.0}, "lora.alpha must be > 0"),
        ({"targets": ()}, "non-empty"),
        ({"targets": ("q", "x")}, "['q', 'k', 'v', 'o', 'mlp']"),
        ({"targets": ("q", "q")}, "distinct"),
        ({"last_blocks": -1}, "lora.last_blocks must be null"),
        ({"init": "kaiming"}, "['xavier_uniform', 'normal', 'kaiming_uniform']"),
        ({"gain": 0.0}, "lora.gain and lora.std must be > 0"),
        ({"std": -0.1}, "lora.gain and lora.std must be > 0"),
    ],
)
def test_invalid_values_say_what_is_allowed(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        LoRASpec(**options)  # type: ignore[arg-type]
    assert message in str(error.value)


@pytest.mark.parametrize("last_blocks", [None, 0, 1, 12])
def test_valid_last_blocks(last_blocks: int | None) -> None:
    assert LoRASpec(last_blocks=last_blocks).last_blocks == last_blocks
