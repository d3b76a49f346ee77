"""Inject LoRA-Ensemble layers into a backbone (paper section 3).

:func:`inject_lora` replaces the target projections named by the family's table
(:mod:`lorae.lora.targets`) with :class:`~lorae.lora.layers.LoRAEnsembleLinear` (or the fused
q/k/v variant), then freezes everything except the LoRA factors: the pretrained weights are
shared by all members and never trained.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

from torch import Tensor, nn

from lorae.errors import ConfigError
from lorae.lora.config import LoRASpec
from lorae.lora.layers import LoRAEnsembleFusedLinear, LoRAEnsembleLinear
from lorae.lora.targets import ATTENTION, QKV, TARGETS, FamilyTargets, Projection


def _block_index(pattern: str, name: str) -> int | None:
    match = re.fullmatch(pattern, name)
    return None if match is None else int(match.group(1))


def _find_targets(
    model: nn.Module, spec: FamilyTargets, kind: type[nn.Module] = nn.Linear
) -> list[tuple[str, int, tuple[str, ...]]]:
    """``(module name, block index, projection keys)`` for every ``kind`` module at a target."""
    found: list[tuple[str, int, tuple[str, ...]]] = []
    for name, module in model.named_modules():
        if not isinstance(module, kind):
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


def family_targets(family: str) -> FamilyTargets:
    """The target table entry of ``family``, or a ConfigError listing the known families."""
    if family not in TARGETS:
        raise ConfigError(f"Unknown backbone family {family!r}; known: {sorted(TARGETS)}.")
    return TARGETS[family]


#: Builds the replacement of one target linear: ``(base, projection keys it holds, enabled)``.
LayerBuilder = Callable[[nn.Linear, tuple[str, ...], list[str]], nn.Module]


def replace_projections(
    model: nn.Module,
    family: str,
    build: LayerBuilder,
    targets: Sequence[Projection] = ATTENTION,
    last_blocks: int | None = None,
) -> list[str]:
    """Replace the target linears of ``model`` in place with ``build(base, keys, enabled)``.

    The shared placement logic of every method that swaps projections (LoRA-Ensemble,
    BatchEnsemble): the family's ``prepare`` rewrite, target matching, the ``targets`` and
    ``last_blocks`` filters. Nothing is frozen here.

    Returns:
        Qualified names of the replaced modules.
    """
    spec = family_targets(family)
    allowed = {*ATTENTION, "mlp"}
    bad = [t for t in targets if t not in allowed]
    if bad or not targets:
        raise ConfigError(
            f"targets must be a non-empty subset of {sorted(allowed)}, got {list(targets)}."
        )
    if last_blocks is not None and last_blocks < 1:
        raise ConfigError(
            f"last_blocks must be >= 1 or None here, got {last_blocks} (for no adapters at "
            "all, LoRAEnsemble takes last_blocks: 0, the head-only ensemble)."
        )
    if spec.prepare is not None:
        spec.prepare(model)
    candidates = _find_targets(model, spec)
    if not candidates:
        raise ConfigError(
            f"No LoRA target projection found in this {family} model; expected modules matching "
            f"{[p for p in (spec.fused_qkv, *spec.linear.values()) if p]}."
        )
    num_blocks = 1 + max(block for _, block, _ in candidates)
    first_block = 0 if last_blocks is None else max(0, num_blocks - last_blocks)
    wrapped: list[str] = []
    for name, block, keys in candidates:
        enabled = [k for k in keys if k in targets]
        if block < first_block or not enabled:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, build(getattr(parent, child), keys, enabled))
        wrapped.append(name)
    return wrapped


def inject_lora(model: nn.Module, family: str, spec: LoRASpec, num_members: int) -> list[str]:
    """Replace the target projections of ``model`` in place with LoRA-Ensemble layers.

    Args:
        model: the backbone network (its module names must follow ``family``'s table).
        family: one of :data:`lorae.lora.targets.TARGETS` (``timm_vit``, ``torchvision_vit``,
            ``hf_bert``).
        spec: rank, scale, init and placement (``targets``, ``last_blocks`` >= 1 or
            ``None``; ``0``, no adapters at all, is LoRAEnsemble's head-only ensemble).
        num_members: ensemble size M; ``1`` is "single network with LoRA".

    Returns:
        Qualified names of the wrapped modules.

    After the call only LoRA factors require gradients; every other parameter of ``model``
    is frozen (heads live outside the backbone and are not touched).
    """

    def build(base: nn.Linear, keys: tuple[str, ...], enabled: list[str]) -> nn.Module:
        if keys == QKV:
            return LoRAEnsembleFusedLinear(base, QKV, enabled, num_members, spec)
        return LoRAEnsembleLinear(base, num_members, spec)

    family_targets(family)  # an unknown family fails before the model is touched
    if num_members < 1:
        raise ConfigError(f"num_members must be >= 1, got {num_members}.")
    model.requires_grad_(False)
    return replace_projections(model, family, build, spec.targets, spec.last_blocks)


def lora_layers(model: nn.Module) -> dict[str, LoRAEnsembleLinear]:
    """All LoRA-Ensemble layers of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAEnsembleLinear)}


def attention_parts(
    model: nn.Module, family: str, kind: type[nn.Module]
) -> Iterator[tuple[str, str, nn.Module, slice]]:
    """Every attention projection (q, k, v, o) held by a ``kind`` module at a target position.

    Yields:
        ``(key, projection, module, rows)``: ``key`` is ``"<block>.<projection>"`` (the
        format of :meth:`~lorae.methods.EnsembleMethod.member_weights`), ``rows`` the output
        rows of ``module``'s weight that belong to the projection (a third of a fused qkv).
    """
    for name, block, keys in _find_targets(model, family_targets(family), kind):
        module = model.get_submodule(name)
        for j, key in enumerate(keys):
            if key in ATTENTION:
                size = module_out_features(module) // len(keys)
                yield f"{block}.{key}", key, module, slice(j * size, (j + 1) * size)


def module_out_features(module: nn.Module) -> int:
    """Output width of a linear projection, or of the linear ``base`` a wrapper holds."""
    base = getattr(module, "base", None)
    weight = (base if isinstance(base, nn.Linear) else module).weight
    assert isinstance(weight, Tensor)
    return int(weight.shape[-2])


#: Which pretrained backbone weights train besides the adapters (paper appendix F): none
#: (the paper's default), the input embedding ("tokenizer"), or all of them ("full").
BackboneTraining = Literal["none", "embedding", "all"]


def train_backbone_weights(model: nn.Module, family: str, which: BackboneTraining) -> None:
    """Unfreeze the pretrained weights ``which`` names; the adapters are left as they are.

    The unfrozen weights are shared by all members (one copy, trained by every member's loss).
    """
    if which == "all":
        model.requires_grad_(True)  # the adapters train anyway
    elif which == "embedding":
        pattern = family_targets(family).embedding
        found = [m for n, m in model.named_modules() if re.fullmatch(pattern, n)]
        if not found:
            raise ConfigError(f"No input embedding module matching {pattern!r} in this model.")
        for module in found:
            module.requires_grad_(True)
    elif which != "none":
        raise ConfigError(f"train_backbone must be 'none', 'embedding' or 'all', got {which!r}.")
