"""Run a model over a dataloader and keep every member's logits."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["collect_member_logits"]


def collect_member_logits(
    model: nn.Module,
    batches: Iterable[Any],
    to_device: Callable[[Any], Any],
    max_samples: int | None = None,
    forward_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> tuple[Tensor, Tensor]:
    """Member logits and targets of every batch, on the CPU in float32.

    The model is put in eval mode for the pass and restored afterwards.

    Args:
        model: returns member logits ``(M, B, C)`` for the inputs of a batch.
        batches: yields ``(inputs, target)``.
        to_device: moves a batch to the model's device.
        max_samples: stop after this many samples (``None``: all).
        forward_context: context of each forward pass (e.g. the trainer's autocast).

    Returns:
        ``(logits, target)``.

    Shape:
        - logits: ``(M, N, C)``
        - target: ``(N,)``
    """
    was_training = model.training
    model.eval()
    chunks: list[Tensor] = []
    targets: list[Tensor] = []
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                inputs, target = to_device(batch)
                with forward_context():
                    logits = model(inputs)
                chunks.append(logits.float().cpu())
                targets.append(target.cpu())
                seen += target.shape[0]
                if max_samples is not None and seen >= max_samples:
                    break
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("The dataloader yielded no batches.")
    logits_all = torch.cat(chunks, dim=1)
    target_all = torch.cat(targets)
    if max_samples is not None:
        logits_all, target_all = logits_all[:, :max_samples], target_all[:max_samples]
    return logits_all, target_all
