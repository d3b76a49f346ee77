"""Inject LoRA-Ensemble layers into a backbone (paper section 3).

:func:`inject_lora` replaces the target projections named by the family's table
(:mod:`lorae.lora.targets`) with :class:`~lorae.lora.layers.LoRAEnsembleLinear` (or the fused
q/k/v variant), then freezes everything except the LoRA factors: the pretrained weights are
shared by all members and never trained.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from lorae.errors import ConfigError
from lorae.lora.layers import LoRAEnsembleFusedLinear, LoRAEnsembleLinear, LoRAInit
from lorae.lora.targets import ATTENTION, QKV, TARGETS, FamilyTargets, Projection


def _block_index(pattern: str, name: str) -> int | None:
    match = re.fullmatch(pattern, name)
    return None if match is None else int(match.group(1))


def _find_targets(model: nn.Module, spec: FamilyTargets) -> list[tuple[str, int, tuple[str, ...]]]:
    """``(module name, block index, projection keys)`` for every linear LoRA should wrap."""
    found: list[tuple[str, int, tuple[str, ...]]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if spec.fused_qkv is not None:
            block = _block_index(spec.fused_qkv, name)
            if block is not None:
                found.append((name, block, QKV))
                continue
        for key, pattern in spec.linear.items():
            block = _block_index(pattern, name)
            if block is not None:
                found.append((name, block, (key,)))
                break
    return found


def inject_lora(
    model: nn.Module,
    family: str,
    num_members: int,
    rank: int,
    targets: Sequence[Projection] = ATTENTION,
    last_blocks: int | None = None,
    alpha: float | None = None,
    init: LoRAInit = "xavier_uniform",
    init_gain: float = 10.0,
    init_std: float = 0.02,
) -> list[str]:
    """Replace the target projections of ``model`` in place with LoRA-Ensemble layers.

    Args:
        model: the backbone network (its module names must follow ``family``'s table).
        family: one of :data:`lorae.lora.targets.TARGETS` (``timm_vit``, ``torchvision_vit``,
            ``hf_bert``).
        num_members: ensemble size M; ``1`` is "single network with LoRA".
        rank: LoRA rank R.
        targets: projections to adapt: any of ``q``, ``k``, ``v``, ``o`` (attention, the
            paper's default) and ``mlp``.
        last_blocks: adapt only the last k transformer blocks (``None``: all blocks).
        alpha, init, init_gain, init_std: see :class:`~lorae.lora.layers.LoRAEnsembleLinear`.

    Returns:
        Qualified names of the wrapped modules.

    After the call only LoRA factors require gradients; every other parameter of ``model``
    is frozen (heads live outside the backbone and are not touched).
    """
    if family not in TARGETS:
        raise ConfigError(f"Unknown backbone family {family!r}; known: {sorted(TARGETS)}.")
    spec = TARGETS[family]
    allowed = {*ATTENTION, "mlp"}
    bad = [t for t in targets if t not in allowed]
    if bad or not targets:
        raise ConfigError(
            f"targets must be a non-empty subset of {sorted(allowed)}, got {list(targets)}."
        )
    if last_blocks is not None and last_blocks < 1:
        raise ConfigError(f"last_blocks must be >= 1 or None, got {last_blocks}.")
    if spec.prepare is not None:
        spec.prepare(model)
    candidates = _find_targets(model, spec)
    if not candidates:
        raise ConfigError(
            f"No LoRA target found in this {family} model; expected modules matching "
            f"{[p for p in (spec.fused_qkv, *spec.linear.values()) if p]}."
        )
    num_blocks = 1 + max(block for _, block, _ in candidates)
    first_block = 0 if last_blocks is None else max(0, num_blocks - last_blocks)

    model.requires_grad_(False)
    wrapped: list[str] = []
    for name, block, keys in candidates:
        enabled = [k for k in keys if k in targets]
        if block < first_block or not enabled:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        layer: LoRAEnsembleLinear
        if keys == QKV:
            layer = LoRAEnsembleFusedLinear(
                base, QKV, enabled, num_members, rank, alpha, init, init_gain, init_std
            )
        else:
            layer = LoRAEnsembleLinear(base, num_members, rank, alpha, init, init_gain, init_std)
        setattr(parent, child, layer)
        wrapped.append(name)
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRAEnsembleLinear]:
    """All LoRA-Ensemble layers of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAEnsembleLinear)}
