"""The paper's LoRA-Ensemble layer: a per-member functional call vmapped over stacked factors.

The reference implementation of the paper (Halbheer et al., section 3 and its released code)
evaluates every member's adapted projection ``W_0 x + (alpha/R) B_i A_i x`` with
``torch.vmap`` over the member axis. :class:`VmapLoRALinear` does exactly that on the same
parameters as :class:`~lorae.lora.LoRAEnsembleLinear` (it holds the very same ``A``, ``B`` and
frozen ``base``), so swapping it into a built :class:`~lorae.methods.LoRAEnsemble` with
:func:`use_vmap_reference` gives the same function computed the paper's way: the benchmark
compares implementations, never different models.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorae.lora import LoRAEnsembleLinear


class VmapLoRALinear(nn.Module):
    """A LoRA-Ensemble projection evaluated member by member under ``torch.vmap``.

    Args:
        layer: the layer to re-implement; its frozen ``base`` and its ``A``, ``B`` parameters
            are shared (not copied), a fused q/k/v layer included (its block-diagonal
            ``up_projection`` writes each part's delta into its own output slice).

    Shape:
        - input ``(M*B, ..., D_in)`` member-major
        - output ``(M*B, ..., D_out)``
    """

    def __init__(self, layer: LoRAEnsembleLinear) -> None:
        super().__init__()
        self.layer = layer
        self._vmapped = torch.vmap(self._member, in_dims=(0, 0, 0))

    def _member(self, x: Tensor, down: Tensor, up: Tensor) -> Tensor:
        """One member's adapted projection ``W_0 x + s * up (down x)``, the vmapped function.

        Shape:
            x ``(B, ..., D_in)``, down ``(P*R, D_in)``, up ``(D_out, P*R)`` -> ``(B, ..., D_out)``
        """
        base = self.layer.base
        bias = None if base.bias is None else base.bias.to(x.dtype)
        out = nn.functional.linear(x, base.weight.to(x.dtype), bias)
        low = nn.functional.linear(x, down.to(x.dtype))
        return out + self.layer.scale * nn.functional.linear(low, up.to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        m = self.layer.num_members
        xm = x.reshape(m, -1, *x.shape[1:])  # (M, B, ..., D_in)
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # Inside vmap, autocast leaves a biased nn.Linear in float32 (seen with torch 2.14):
            # cast explicitly so that bf16-mixed runs this reference in bf16 like the others.
            xm = xm.to(torch.get_autocast_dtype(device))
        out = self._vmapped(xm, self.layer.down_projection(), self.layer.up_projection())
        return out.reshape(-1, *out.shape[2:])


def use_vmap_reference(model: nn.Module) -> list[str]:
    """Replace every :class:`~lorae.lora.LoRAEnsembleLinear` in ``model`` (in place) by a
    :class:`VmapLoRALinear` over the same parameters.

    The wrapped layer stays a submodule (``<name>.layer``), so parameters keep being trained
    and counted once. Returns the qualified names of the replaced modules.
    """
    replaced = [n for n, m in model.named_modules() if isinstance(m, LoRAEnsembleLinear)]
    for name in replaced:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, VmapLoRALinear(getattr(parent, child)))
    return replaced
