"""Explicit Ensemble (deep ensemble, Lakshminarayanan et al. 2017; paper section 5)."""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lorae.backbones.base import Backbone, Inputs, Pretrained
from lorae.errors import ConfigError
from lorae.heads import EnsembleHead
from lorae.lora import attention_parts, family_targets
from lorae.methods.base import BackboneMethod
from lorae.methods.registry import register_method

Vectorize = Literal["auto", "vmap", "loop"]


def _set_tensor(module: nn.Module, name: str, value: Tensor, parameter: bool) -> None:
    parent_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(parent_name)
    if parameter:
        owner._parameters[leaf] = nn.Parameter(value)
    else:
        owner._buffers[leaf] = value


def resolve_vectorize(setting: Vectorize, device_type: str, grad_enabled: bool) -> Vectorize:
    """The path ``ExplicitEnsemble`` takes for one forward pass.

    ``"vmap"`` and ``"loop"`` are taken as set. ``"auto"`` stays ``"auto"`` (vmap, with the
    loop as fallback) except on CUDA with autograd recording, where it is ``"loop"``: vmap
    over the fused ``scaled_dot_product_attention`` kernels runs forward but fails in their
    backward pass (``RuntimeError: LSE is not correctly aligned (strideH)``, torch 2.11 on an
    H200), after the forward's fallback check has passed. The loop computes the same function.
    """
    if setting == "auto" and device_type == "cuda" and grad_enabled:
        return "loop"
    return setting


@register_method("explicit_ensemble")
class ExplicitEnsemble(BackboneMethod):
    """M independent copies of the pretrained backbone, each fully fine-tuned with its own
    head; all members train in one run.

    The members' parameters are stacked, ``(M, ...)`` per tensor, in ``self.members`` (a copy
    of the backbone whose tensors carry the member axis). The forward pass runs the one
    backbone definition with ``torch.func.functional_call`` on each member's slice, either
    vectorised over members with ``torch.vmap`` or in a plain loop; both give the same
    result. ``"auto"`` tries ``vmap`` and falls back to the loop (with a warning) where an
    operation cannot be vectorised; on CUDA it trains with the loop (see
    :func:`resolve_vectorize`).

    Members start from the same pretrained weights and differ by their heads' random init
    (the paper's setting); ``noise_alpha > 0`` adds the weight noise of paper appendix O,
    ``W + alpha * N(0, std(W)^2)`` drawn per member for every attention and MLP weight and bias
    (not LayerNorm) in the last ``noise_blocks`` transformer blocks, as the reference code.

    Torchvision ViTs get the same attention module as for LoRA (a fused ``qkv`` linear,
    computing the same function), so q/k/v/o weights are found by the target table.

    Args:
        num_classes: C (linked from the data module by the CLI).
        backbone: a registered backbone name.
        num_members: M.
        noise_alpha: weight-noise scale alpha (0: no noise, the paper's default).
        noise_blocks: apply the noise to the last k blocks (``None``: all blocks).
        vectorize: ``"auto"``, ``"vmap"`` or ``"loop"``.
        pretrained: ``True`` (download), ``False`` (random) or a local weights path.
        backbone_overrides: architecture arguments for the backbone constructor.

    Shape:
        inputs ``(B, ...)`` -> logits ``(M, B, C)``
    """

    _template: Backbone

    def __init__(
        self,
        num_classes: int,
        backbone: str,
        num_members: int = 16,
        noise_alpha: float = 0.0,
        noise_blocks: int | None = None,
        vectorize: Vectorize = "auto",
        pretrained: Pretrained = True,
        backbone_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        if vectorize not in ("auto", "vmap", "loop"):
            raise ConfigError(f"vectorize must be 'auto', 'vmap' or 'loop', got {vectorize!r}.")
        super().__init__(num_classes, backbone, num_members, pretrained, backbone_overrides)
        self.vectorize = vectorize
        # The members hold stacked copies of the backbone (self.members, below) and its
        # definition runs on the meta device: the one pretrained copy is not kept.
        net = self.backbone
        del self.backbone
        spec = family_targets(net.family)
        if spec.prepare is not None:
            spec.prepare(net.model)
        self.reference = nn.Module()  # the pretrained q/k/v/o weights the members start from
        for key, _, module, rows in attention_parts(net.model, net.family, nn.Linear):
            weight = module.weight
            assert isinstance(weight, Tensor)
            self.reference.register_buffer(key.replace(".", "_"), weight.detach()[rows].clone())
        noisy = _noisy_parameters(net, spec.block, noise_blocks) if noise_alpha > 0 else set()
        stacked: dict[str, Tensor] = {}
        for name, param in net.named_parameters():
            members = param.detach().unsqueeze(0).repeat(num_members, *([1] * param.dim()))
            if name in noisy:
                std = param.detach().std()
                members += noise_alpha * std * torch.randn_like(members)
            stacked[name] = members
        buffers = {
            n: b.unsqueeze(0).repeat(num_members, *([1] * b.dim())) for n, b in net.named_buffers()
        }
        # The definition runs on the meta device: functional_call supplies every tensor.
        template = net.to("meta")
        self.members: Backbone = copy.deepcopy(template)
        for name, value in stacked.items():
            _set_tensor(self.members, name, value, parameter=True)
        for name, value in buffers.items():
            _set_tensor(self.members, name, value, parameter=False)
        object.__setattr__(self, "_template", template)  # not a submodule: holds no data
        self.head = EnsembleHead(num_members, net.feature_dim, num_classes)

    def _features(self, x: Inputs, vectorize: Literal["vmap", "loop"]) -> Tensor:
        """Every member's features. Shape: ``(M, B, D)``."""
        template = self._template
        template.train(self.training)
        params: dict[str, Tensor] = dict(self.members.named_parameters())
        buffers: dict[str, Tensor] = dict(self.members.named_buffers())
        if vectorize == "vmap":

            def member(p: dict[str, Tensor], b: dict[str, Tensor], inputs: Inputs) -> Tensor:
                return functional_call(template, (p, b), (inputs,))

            run = torch.vmap(member, in_dims=(0, 0, None), randomness="different")
            return run(params, buffers, x)
        return torch.stack(
            [
                functional_call(
                    template,
                    ({n: p[i] for n, p in params.items()}, {n: b[i] for n, b in buffers.items()}),
                    (x,),
                )
                for i in range(self.num_members)
            ]
        )

    def forward(self, x: Inputs) -> Tensor:
        mode = resolve_vectorize(
            self.vectorize, self.head.weight.device.type, torch.is_grad_enabled()
        )
        if mode == "auto":
            try:
                features = self._features(x, "vmap")
            except (RuntimeError, NotImplementedError) as error:
                warnings.warn(
                    f"ExplicitEnsemble: vmap over members failed ({error}); running members "
                    "in a loop from now on.",
                    stacklevel=2,
                )
                self.vectorize = "loop"
                features = self._features(x, "loop")
        else:
            features = self._features(x, mode)
        return self.head(features.reshape(-1, features.shape[-1]))  # (M, B, C)

    @torch.no_grad()
    def member_weights(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Reference: the pretrained weight every member started from (kept as buffers);
        members: each member's current weight.

        Shape:
            ``{"<block>.<q|k|v|o>": ((D_out, D_in), (M, D_out, D_in))}``
        """
        weights: dict[str, tuple[Tensor, Tensor]] = {}
        model, family = self.members.model, self.members.family
        for key, _, module, rows in attention_parts(model, family, nn.Linear):
            members = module.weight
            assert isinstance(members, Tensor)
            weights[key] = (self.reference.get_buffer(key.replace(".", "_")), members[:, rows])
        return weights


def _noisy_parameters(net: Backbone, block_pattern: str, last_blocks: int | None) -> set[str]:
    """Names (in ``net``) of the attention and MLP weights and biases of the last
    ``last_blocks`` blocks (LayerNorm parameters are left as they are)."""
    norms = {n for n, m in net.model.named_modules() if isinstance(m, nn.LayerNorm)}
    blocks: dict[str, int] = {}
    for name, _ in net.model.named_parameters():
        match = re.match(block_pattern, name)
        if match is not None and name.rpartition(".")[0] not in norms:
            blocks[f"model.{name}"] = int(match.group(1))
    if not blocks:
        raise ConfigError("noise_alpha > 0 but no transformer-block weights were found.")
    first = 0 if last_blocks is None else max(blocks.values()) + 1 - last_blocks
    return {name for name, block in blocks.items() if block >= first}
