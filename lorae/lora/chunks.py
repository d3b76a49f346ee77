"""Running LoRA-Ensemble members in chunks through the whole backbone.

All M members normally run as one batch of ``M*B`` rows (paper section 3). That is the
fastest way while the batch is small, but on a CPU a very large batch runs slower per row
than several smaller ones (cache pressure). Measured on the 2-core build machine with a timm
ViT-B/32 at M = 16 (issue 6): one batch of 16 rows took 0.55 s against 0.95 s for 16 batches
of 1, but one batch of 512 rows took 21.3 s against 18.5 s for 16 batches of 32. So members
run in consecutive chunks of k, each chunk a batch of ``k*B`` rows in which every LoRA layer
uses only the factors ``A[m0:m0+k]``, ``B[m0:m0+k]`` (views passed with
``torch.func.functional_call``, :func:`member_factors`; no parameter copies). The chunks'
features are concatenated member-major and the heads applied once, so logits and gradients
equal the unchunked pass.

``"auto"`` picks ``k = max(1, ROW_BUDGET[device] // B)`` members per chunk (at most M): one
batch at small B, chunks of about ``ROW_BUDGET`` rows at large B.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, TypeAlias

import torch
from torch import Tensor

from lorae.errors import ConfigError
from lorae.lora.layers import LoRAEnsembleLinear

#: ``None``: all members in one batch; an int k: chunks of k members; ``"auto"``: from the
#: device's row budget (:data:`ROW_BUDGET`).
MemberChunkSize: TypeAlias = int | Literal["auto"] | None

#: Rows (``k*B``) per chunk that ``"auto"`` aims for, per device type. CPU: issue 6's
#: measurements put the per-row optimum between 16 and 32 rows of a ViT-B/32 (50 tokens);
#: CUDA: large batches keep a GPU busy, chunks only bound the activation memory.
ROW_BUDGET: dict[str, int] = {"cpu": 32, "cuda": 2048}
#: Row budget of device types missing from :data:`ROW_BUDGET` (e.g. ``mps``).
DEFAULT_ROW_BUDGET = 256


def check_chunk_size(chunk_size: MemberChunkSize) -> None:
    """Raise a ConfigError unless ``chunk_size`` is ``None``, ``"auto"`` or an int >= 1."""
    valid_int = isinstance(chunk_size, int) and not isinstance(chunk_size, bool)
    if chunk_size is None or chunk_size == "auto" or (valid_int and chunk_size >= 1):
        return
    raise ConfigError(
        f"member_chunk_size must be null (all members in one batch), 'auto' or an integer "
        f">= 1 (members per chunk), got {chunk_size!r}."
    )


def auto_chunk_size(num_members: int, batch: int, device: torch.device) -> int:
    """Members per chunk chosen by ``"auto"``: ``k*B`` near the device's row budget, k >= 1.

    Args:
        num_members: M.
        batch: B, samples per member.
        device: where the backbone runs (its ``type`` selects the budget).
    """
    budget = ROW_BUDGET.get(device.type, DEFAULT_ROW_BUDGET)
    return max(1, min(num_members, budget // max(batch, 1)))


def member_chunks(
    num_members: int, batch: int, chunk_size: MemberChunkSize, device: torch.device
) -> list[slice]:
    """Consecutive member windows covering ``range(num_members)``.

    Args:
        num_members: M.
        batch: B, samples per member.
        chunk_size: ``None`` (one window), an int k or ``"auto"`` (:func:`auto_chunk_size`).
        device: where the backbone runs.

    Returns:
        Slices ``m0:m0+k`` in member order; the last one may be shorter.
    """
    if chunk_size is None:
        k = num_members
    elif chunk_size == "auto":
        k = auto_chunk_size(num_members, batch, device)
    else:
        k = min(chunk_size, num_members)
    return [slice(start, min(start + k, num_members)) for start in range(0, num_members, k)]


def member_factors(layers: Mapping[str, LoRAEnsembleLinear], members: slice) -> dict[str, Tensor]:
    """The LoRA factors of the members in ``members``, as views, for ``functional_call``.

    Passed to :func:`torch.func.functional_call`, they make every layer run only those
    members (its member count is read from ``A``) on ``(k*B, ..., D_in)`` inputs,
    ``k = len(members)``; being views, their gradients reach the full ``A`` and ``B``. The
    views keep the same shapes for every full chunk, so a compiled backbone reuses one graph.

    Args:
        layers: LoRA layers by qualified name relative to the module ``functional_call`` runs.
        members: the member window.

    Returns:
        ``{"<name>.A": A[members], "<name>.B": B[members]}`` for every layer.
    """
    factors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        factors[f"{name}.A"] = layer.A[members]
        factors[f"{name}.B"] = layer.B[members]
    return factors
