"""A shared trunk: run the blocks before the first adapted block once, then fan out.

When LoRA sits only in the last k transformer blocks (``last_blocks``, paper Tab. 7 /
appendix F), everything before the first adapted block computes the same activations for
every member. :class:`SharedTrunk` makes the backbone compute them once on the B samples and
repeat them member-major (row ``m*B + b``) only where the members start to differ:

- a forward pre-hook on the backbone model keeps the first B rows of every input tensor that
  arrives repeated for the members (a view, so the trunk sees B rows);
- a forward pre-hook on every block from the first adapted one on repeats each top-level
  tensor argument with B leading rows (hidden states, attention masks) ``repeats`` times; the
  later blocks get their hidden states already repeated and only the masks are repeated;
- for member chunks after the first (:mod:`lorae.lora.chunks`) the trunk blocks replay their
  outputs of the first chunk instead of recomputing them, so the trunk runs once per batch
  (the cheap embedding before the first block is recomputed on B rows and discarded).

All hooks are inert outside :meth:`SharedTrunk.fan_out`, so the backbone called directly
with a member-repeated batch computes the unshared way. In training, dropout inside the
trunk draws one mask per sample, shared by all members (the trunk is one computation).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lorae.errors import ConfigError
from lorae.lora.inject import family_targets


def transformer_blocks(model: nn.Module, family: str) -> list[nn.Module]:
    """The transformer blocks of ``model`` in order (the family's ``block_module`` pattern)."""
    pattern = family_targets(family).block_module
    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        match = re.fullmatch(pattern, name)
        if match is not None:
            found[int(match.group(1))] = module
    if sorted(found) != list(range(len(found))):
        raise ConfigError(
            f"Transformer blocks of this {family} model are not numbered 0..n-1: {sorted(found)}."
        )
    return [found[i] for i in range(len(found))]


def first_block(names: Sequence[str], family: str) -> int:
    """The lowest transformer-block index among the qualified module ``names``."""
    pattern = family_targets(family).block
    indices = [int(m.group(1)) for n in names if (m := re.match(pattern, n)) is not None]
    if not indices:
        raise ConfigError(f"None of {list(names)} lies inside a transformer block of {family}.")
    return min(indices)


def _map_tensors(
    args: tuple[Any, ...], kwargs: dict[str, Any], rows: int, fn: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Apply ``fn`` to every top-level tensor argument with ``rows`` leading rows."""

    def apply(value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows:
            return fn(value)
        return value

    return tuple(apply(a) for a in args), {k: apply(v) for k, v in kwargs.items()}


class SharedTrunk:
    """Hooks that compute the blocks before ``first_adapted`` once per sample (module doc).

    Args:
        model: the backbone network (``Backbone.model``).
        family: its LoRA target-table family (selects the block-module pattern).
        first_adapted: index of the first transformer block holding a member-specific layer.

    Shape:
        inside :meth:`fan_out`: the model takes ``(repeats*B, ...)`` member-major inputs and
        returns ``(repeats*B, ...)``, computing blocks ``< first_adapted`` on ``B`` rows.
    """

    def __init__(self, model: nn.Module, family: str, first_adapted: int) -> None:
        blocks = transformer_blocks(model, family)
        if not 0 <= first_adapted < len(blocks):
            raise ConfigError(
                f"first adapted block {first_adapted} is outside the model's {len(blocks)} blocks."
            )
        self.first_adapted = first_adapted
        self.trunk_blocks = blocks[:first_adapted]
        self._batch: int | None = None
        self._repeats = 1
        self._replay = False
        self._outputs: dict[int, Any] = {}
        self.handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._take_one_copy, with_kwargs=True)
        ]
        for block in blocks[first_adapted:]:
            self.handles.append(block.register_forward_pre_hook(self._repeat, with_kwargs=True))
        for index, block in enumerate(self.trunk_blocks):
            # partial of a bound method, not a closure: a deepcopy of the model rebinds it.
            self.handles.append(block.register_forward_hook(functools.partial(self._record, index)))

    @contextmanager
    def fan_out(self, batch: int, repeats: int, replay: bool = False) -> Iterator[None]:
        """Within the block, model calls share the trunk across ``repeats`` members.

        Args:
            batch: B, samples per member.
            repeats: members in this call (the model input has ``repeats*B`` rows).
            replay: reuse the trunk outputs of the previous call in this batch (a later member
                chunk) instead of recomputing them; ``False`` records them afresh.
        """
        self._batch, self._repeats = batch, repeats
        if replay:
            self._replay = True
            for index, block in enumerate(self.trunk_blocks):
                block.forward = functools.partial(self._replay_output, index)
        else:
            self._outputs.clear()
        try:
            yield
        finally:
            if replay:
                for block in self.trunk_blocks:
                    del block.forward
            self._batch, self._repeats, self._replay = None, 1, False

    def release(self) -> None:
        """Forget the recorded trunk outputs (call after the last chunk of a batch)."""
        self._outputs.clear()

    def remove(self) -> None:
        """Remove all hooks (the model then always computes the unshared way)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _take_one_copy(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        batch = self._batch
        if batch is None or self._repeats == 1:
            return None
        return _map_tensors(args, kwargs, self._repeats * batch, lambda t: t[:batch])

    def _repeat(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        batch, repeats = self._batch, self._repeats
        if batch is None or repeats == 1:
            return None
        return _map_tensors(
            args, kwargs, batch, lambda t: t.repeat(repeats, *([1] * (t.dim() - 1)))
        )

    def _record(self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._batch is not None and not self._replay:
            self._outputs[index] = output

    def _replay_output(self, index: int, *args: Any, **kwargs: Any) -> Any:
        if index not in self._outputs:
            raise RuntimeError("Shared trunk replay without a recorded first chunk.")
        return self._outputs[index]
