"""DropKey (Li et al. 2023, "DropKey for Vision Transformer"): dropout on the attention *keys*.

The paper's MC Dropout baseline is "Monte Carlo Dropout (MC Dropout) as implemented in Li et
al. (2023)" (section 4; appendix T sweeps its probability, 0.2 is the default). DropKey moves
dropout before the softmax and makes the key the unit it drops: for every row of the batch,
every head and every query, each key is dropped with probability ``p`` by giving its
attention logit ``q·k / sqrt(d)`` a large negative value before the softmax. The softmax then
renormalises over the kept keys, so there is no ``1 / (1 - p)`` rescaling (DropKey has none).
As in the LoRA-Ensemble reference code, the mask is drawn at training *and* at evaluation,
independently for every row of the batch, so the member-major batch ``(M*B, ...)`` gives each
member its own masks and M stochastic passes are one batched pass.

Mechanism: a forward pre-hook on each attention module of the family (the module names are a
table, like LoRA's targets) passes an additive mask ``(N, H, T_q, T_k)``, 0 for kept keys and
the compute dtype's minimum for dropped ones, through the module's own attention-mask
argument, so each family keeps its own attention kernel (timm ``Attention`` and Hugging Face's
BERT self-attention: ``scaled_dot_product_attention``; torchvision: ``nn.MultiheadAttention``).
A mask the model passes itself (BERT's padding mask) is added to it. The finite minimum
(rather than ``-inf``) keeps a row whose every key was dropped finite (uniform attention, as
the reference's ``-1e12``) instead of NaN; with ``T_k`` keys that happens with probability
``p^T_k``. Module names and the ``state_dict`` are unchanged: a hook holds no weights.

Lives in :mod:`lorae.lora` beside :mod:`lorae.lora.mha` and the target table because it is the
same kind of per-family surgery on attention modules (and works on the LoRA-injected
``MultiheadSelfAttention`` too); :mod:`lorae.backbones` may not import this package.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["DROPKEY_SITES", "DropKey", "DropKeySite", "dropkey_bias"]

#: How an attention module receives its input and its mask.
#: ``"timm"``: ``forward(x, attn_mask=None)``, x ``(N, T, D)``, mask ``(N, H, T, T)`` additive
#: (bool: True = attend). ``"torch_mha"``: ``forward(query, key, value, ..., attn_mask=None)``,
#: mask ``(N*H, T, T)`` additive (bool: True = masked), ``batch_first`` as set on the module.
#: ``"hf"``: ``forward(hidden_states, attention_mask=None, ...)``, mask broadcastable to
#: ``(N, H, T, T)`` additive (bool: True = attend).
CallStyle = Literal["timm", "torch_mha", "hf"]


@dataclass(frozen=True)
class DropKeySite:
    """Where DropKey hooks in one backbone family.

    Attributes:
        pattern: full-match regex of the attention modules' qualified names.
        style: how those modules take their input and mask (see :data:`CallStyle`).
        heads: the attribute holding the number of heads H.
    """

    pattern: str
    style: CallStyle
    heads: str


#: Keyed by ``lorae.backbones.base.BackboneFamily`` (AST is a timm ViT).
DROPKEY_SITES: dict[str, DropKeySite] = {
    "timm_vit": DropKeySite(r"blocks\.\d+\.attn", "timm", "num_heads"),
    "torchvision_vit": DropKeySite(
        r"encoder\.layers\.encoder_layer_\d+\.self_attention", "torch_mha", "num_heads"
    ),
    "hf_bert": DropKeySite(r"encoder\.layer\.\d+\.attention\.self", "hf", "num_attention_heads"),
}


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention logits are computed in: autocast's when it is on, else ``x``'s."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def dropkey_bias(dropped: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive logit mask of a DropKey draw: 0 where kept, ``finfo(dtype).min`` where
    dropped.

    Shape:
        dropped, output: ``(N, H, T_q, T_k)``
    """
    bias = torch.zeros(dropped.shape, dtype=dtype, device=dropped.device)
    return bias.masked_fill_(dropped, torch.finfo(dtype).min)


def _additive(mask: Tensor, dtype: torch.dtype, true_means_keep: bool) -> Tensor:
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    blocked = mask.logical_not() if true_means_keep else mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        blocked, torch.finfo(dtype).min
    )


class DropKey:
    """Bernoulli(``p``) key masks on the attention logits of every attention module of a
    backbone, drawn anew at every call, in training and in evaluation.

    Args:
        p: the probability of dropping a key (per row, head, query and key); 0 turns the
            hooks into no-ops (the model is then the plain backbone, bit for bit).

    Attributes:
        record: keep every drawn mask in :attr:`recorded` (for tests and inspection).
        recorded: ``(module name, dropped)`` per hooked call when ``record``; ``dropped`` is
            bool ``(N, H, T_q, T_k)``, True where the logit was masked.
    """

    def __init__(self, p: float) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropKey needs a probability in [0, 1), got {p}.")
        self.p = p
        self.record = False
        self.recorded: list[tuple[str, Tensor]] = []
        self._handles: list[RemovableHandle] = []

    def __repr__(self) -> str:
        return f"DropKey(p={self.p}, modules={len(self._handles)})"

    def attach(self, model: nn.Module, family: str) -> list[str]:
        """Hook every attention module of ``model`` (a backbone family's network).

        Returns:
            The qualified names of the hooked modules (empty if the family has none).

        Raises:
            KeyError: ``family`` has no entry in :data:`DROPKEY_SITES`.
        """
        site = DROPKEY_SITES[family]
        names = []
        for name, module in model.named_modules():
            if re.fullmatch(site.pattern, name):
                hook = self._hook(name, site, int(getattr(module, site.heads)))
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                names.append(name)
        return names

    def detach(self) -> None:
        """Remove every hook this object added."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def draw(self, shape: tuple[int, int, int, int], device: torch.device) -> Tensor:
        """A fresh mask, True = dropped, each entry independently with probability ``p``.

        Shape:
            output: ``shape`` = ``(N, H, T_q, T_k)``
        """
        return torch.rand(shape, device=device) < self.p

    def _hook(
        self, name: str, site: DropKeySite, heads: int
    ) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            if self.p == 0.0:
                return None
            if site.style == "torch_mha":
                return args, self._mha_kwargs(module, name, heads, args, kwargs)
            key = "attn_mask" if site.style == "timm" else "attention_mask"
            x = args[0] if args else kwargs["hidden_states" if site.style == "hf" else "x"]
            positional = len(args) > 1  # the mask is the second argument of both styles
            n, t = x.shape[0], x.shape[1]
            dropped = self._dropped(name, (n, heads, t, t), x.device)
            dtype = compute_dtype(x)
            bias = dropkey_bias(dropped, dtype)
            given = args[1] if positional else kwargs.get(key)
            if given is not None:
                bias = bias + _additive(given, dtype, true_means_keep=True)
            if positional:
                return (args[0], bias, *args[2:]), kwargs
            return args, {**kwargs, key: bias}

        return hook

    def _mha_kwargs(
        self,
        module: nn.Module,
        name: str,
        heads: int,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> dict[str, Any]:
        query: Tensor = args[0] if args else kwargs["query"]
        key: Tensor = args[1] if len(args) > 1 else kwargs["key"]
        batch_first = bool(getattr(module, "batch_first", False))
        n = query.shape[0] if batch_first else query.shape[1]
        t_q = query.shape[1] if batch_first else query.shape[0]
        t_k = key.shape[1] if batch_first else key.shape[0]
        dropped = self._dropped(name, (n, heads, t_q, t_k), query.device)
        dtype = compute_dtype(query)
        bias = dropkey_bias(dropped, dtype).view(n * heads, t_q, t_k)
        given = kwargs.get("attn_mask")
        if given is not None:
            bias = bias + _additive(given, dtype, true_means_keep=False)
        return {**kwargs, "attn_mask": bias}

    def _dropped(self, name: str, shape: tuple[int, int, int, int], device: torch.device) -> Tensor:
        dropped = self.draw(shape, device)
        if self.record:
            self.recorded.append((name, dropped))
        return dropped
