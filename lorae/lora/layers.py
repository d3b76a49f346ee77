"""Batched LoRA-Ensemble layers (paper section 3, Eq. 3).

For member ``i`` the adapted projection is ``W_i = W_0 + (alpha / R) B_i A_i``: the frozen
pretrained weight ``W_0`` is shared and kept once; every member owns ``A_i (R, D_in)`` and
``B_i (D_out, R)``. The input arrives member-major, ``(M*B, ..., D_in)`` with row ``m*B + b``
being sample ``b`` of member ``m``, so the base projection runs once over the whole batch and
all members' low-rank deltas are added with one batched matmul over the member axis (no
Python loop over members, no per-member weight copies).

The member count is read from ``A``, so the same layer runs any stack of factors passed
with ``torch.func.functional_call``: a chunk of members (views ``A[m0:m0+k]``, see
:mod:`lorae.lora.chunks`), snapshots or posterior samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lorae.errors import ConfigError
from lorae.lora.config import LoRAInit, LoRASpec


@torch.no_grad()
def init_lora_a(a: Tensor, init: LoRAInit, gain: float, std: float) -> None:
    """Initialise stacked ``A`` matrices in place, each ``(R, D_in)`` slice drawn on its own.

    Paper appendix N: Xavier-uniform with gain 10 (default, so members start diverse) or a
    Gaussian with standard deviation ``std``; or PEFT's default, Kaiming-uniform with
    ``a = sqrt(5)`` (what ``nn.Linear`` and PEFT's ``lora_A`` start from; ``gain`` and ``std``
    unused). ``B`` starts at zero so the adapted model equals the pretrained one at
    initialisation.

    Shape:
        a: ``(..., R, D_in)``; every leading index is one independently drawn matrix.
    """
    for matrix in a.view(-1, a.shape[-2], a.shape[-1]):
        if init == "xavier_uniform":
            nn.init.xavier_uniform_(matrix, gain=gain)
        elif init == "kaiming_uniform":
            nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
        else:
            nn.init.normal_(matrix, mean=0.0, std=std)


def _members_view(x: Tensor, num_members: int) -> Tensor:
    """View a member-major batch ``(M*B, ..., D)`` as ``(M, B*..., D)`` without copying."""
    if x.shape[0] % num_members != 0:
        raise ValueError(
            f"LoRA-Ensemble layer with {num_members} members got a batch of {x.shape[0]} rows, "
            "which is not a multiple of the member count: repeat the input member-major "
            "(x.repeat(M, ...)) before the backbone."
        )
    return x.reshape(num_members, -1, x.shape[-1])


class LoRAEnsembleLinear(nn.Module):
    """A frozen ``nn.Linear`` plus one low-rank delta per ensemble member.

    Args:
        base: the pretrained projection ``W_0``; it is frozen and kept (not copied).
        num_members: ensemble size M.
        spec: rank R, scale ``alpha / R`` and the init of ``A`` (its ``targets`` and
            ``last_blocks`` are placement, read by :func:`~lorae.lora.inject.inject_lora`).

    Shape:
        - A: ``(M, R, D_in)``, B: ``(M, D_out, R)``
        - input: ``(M*B, ..., D_in)`` member-major
        - output: ``(M*B, ..., D_out)``
    """

    def __init__(self, base: nn.Linear, num_members: int, spec: LoRASpec) -> None:
        super().__init__()
        self._init_factors(base, num_members, spec, (), (base.out_features,))

    def _init_factors(
        self,
        base: nn.Linear,
        num_members: int,
        spec: LoRASpec,
        parts: tuple[int, ...],
        b_shape: tuple[int, ...],
    ) -> None:
        """Freeze ``base``; create ``A (M, *parts, R, D_in)`` (drawn) and
        ``B (M, *b_shape, R)`` = 0."""
        if num_members < 1:
            raise ConfigError(f"num_members must be >= 1, got {num_members}.")
        self.base = base.requires_grad_(False)
        self.rank = spec.rank
        self.scale = spec.scale
        weight = base.weight
        a_shape = (num_members, *parts, spec.rank, base.in_features)
        self.A = nn.Parameter(weight.new_empty(a_shape))
        self.B = nn.Parameter(weight.new_zeros(num_members, *b_shape, spec.rank))
        init_lora_a(self.A, spec.init, spec.gain, spec.std)

    @property
    def num_members(self) -> int:
        """M, read from ``A`` so that ``torch.func.functional_call`` with other stacked factors
        (posterior samples, snapshots) runs that many members."""
        return int(self.A.shape[0])

    def down_projection(self) -> Tensor:
        """The ``A`` factors stacked along the rank axis. Shape: ``(M, P*R, D_in)``, P = 1 here."""
        return self.A.reshape(self.num_members, -1, self.A.shape[-1])

    def up_projection(self) -> Tensor:
        """The ``B`` factors laid out for one batched matmul. Shape: ``(M, D_out, P*R)``."""
        return self._up(self.B)

    def _up(self, b: Tensor) -> Tensor:
        """``b`` (shaped like ``B``) laid out as ``(M, D_out, P*R)``; here it already is."""
        return b

    def forward(self, x: Tensor) -> Tensor:
        """Base projection once for all rows, plus every member's delta.

        Two ways to add the delta, by what is faster (single-layer timings in
        docs/design.md): with autograd recording, one out-of-place ``baddbmm`` (an in-place
        add into a view would make backward clone the whole output gradient); without it
        (inference), in place into the frozen layer's output (no extra ``(M, N, D_out)``
        buffer).

        Shape:
            ``(M*B, ..., D_in) -> (M*B, ..., D_out)``, member-major
        """
        a, b, m = self.A, self.B, self.num_members
        out = self.base(x)
        xm = _members_view(x, m)  # (M, N, D_in)
        # Under autocast torch.bmm runs in bf16 and the base output is bf16; the explicit
        # casts keep every add dtype-consistent (also for bf16 inputs without autocast).
        hidden = torch.bmm(xm, a.reshape(m, -1, a.shape[-1]).transpose(1, 2).to(xm.dtype))
        hidden = hidden.to(out.dtype)  # (M, N, P*R)
        out_m = out.view(m, -1, out.shape[-1])  # (M, N, D_out)
        if torch.is_grad_enabled() and (out.requires_grad or hidden.requires_grad):
            up = self._up(b).to(out.dtype).transpose(1, 2)
            return torch.baddbmm(out_m, hidden, up, alpha=self.scale).view(out.shape)
        self._add_delta_(out_m, hidden, b)
        return out

    def _add_delta_(self, out: Tensor, hidden: Tensor, b: Tensor) -> None:
        """``out += scale * hidden @ B^T`` per member, in place.

        Shape:
            out ``(M, N, D_out)``, hidden ``(M, N, R)``, b ``(M, D_out, R)``
        """
        out.baddbmm_(hidden, b.transpose(1, 2).to(out.dtype), alpha=self.scale)

    def delta_weight(self) -> Tensor:
        """Every member's weight update ``(alpha/R) B_i A_i``. Shape: ``(M, D_out, D_in)``."""
        return self.scale * torch.bmm(self.up_projection(), self.down_projection())

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, rank={self.rank}, scale={self.scale:g}"


class LoRAEnsembleFusedLinear(LoRAEnsembleLinear):
    """LoRA-Ensemble on a fused projection such as timm's ``attn.qkv`` (``D -> 3D``).

    The fused output is made of equal parts (``q``, ``k``, ``v``); each enabled part gets its
    own delta ``B_{i,p} A_{i,p}`` exactly as if q, k and v were separate ``nn.Linear`` layers.
    All parts share one batched down projection (the ``A`` factors stacked along the rank
    axis). Up projection: with autograd recording, one batched matmul with the ``B`` factors
    placed block-diagonally; in inference, one in-place ``baddbmm_`` per enabled part into
    its own output slice (no zero blocks).

    Args:
        base: the fused frozen projection, ``out_features = len(parts) * D_part``.
        parts: names of the fused parts in output order, e.g. ``("q", "k", "v")``.
        enabled: the parts that get LoRA (a non-empty subset of ``parts``).
        num_members, spec: as in :class:`LoRAEnsembleLinear`.

    Shape:
        - A: ``(M, P, R, D_in)``, B: ``(M, P, D_part, R)`` with P = ``len(enabled)``
        - input ``(M*B, ..., D_in)``, output ``(M*B, ..., len(parts) * D_part)``
    """

    def __init__(
        self,
        base: nn.Linear,
        parts: Sequence[str],
        enabled: Sequence[str],
        num_members: int,
        spec: LoRASpec,
    ) -> None:
        nn.Module.__init__(self)
        unknown = [p for p in enabled if p not in parts]
        if not enabled or unknown:
            raise ConfigError(
                f"enabled parts must be a non-empty subset of {list(parts)}, got {list(enabled)}."
            )
        if base.out_features % len(parts) != 0:
            raise ConfigError(
                f"out_features {base.out_features} does not split into parts {list(parts)}."
            )
        self.parts = tuple(parts)
        self.enabled = tuple(p for p in parts if p in enabled)
        n, part_dim = len(self.enabled), base.out_features // len(parts)
        self._init_factors(base, num_members, spec, (n,), (n, part_dim))
        self._slots = [self.parts.index(p) for p in self.enabled]

    def _add_delta_(self, out: Tensor, hidden: Tensor, b: Tensor) -> None:
        """Each enabled part's delta written in place straight into its own output slice.

        One ``baddbmm_`` per part on a strided view of the output: no block-diagonal ``B``
        (a fresh zero tensor) and no multiplications by its zeros.

        Shape:
            out ``(M, N, len(parts) * D_part)``, hidden ``(M, N, P * R)``,
            b ``(M, P, D_part, R)``
        """
        part_dim = b.shape[2]
        for j, slot in enumerate(self._slots):
            out[:, :, slot * part_dim : (slot + 1) * part_dim].baddbmm_(
                hidden[:, :, j * self.rank : (j + 1) * self.rank],
                b[:, j].transpose(1, 2).to(out.dtype),
                alpha=self.scale,
            )

    def _up(self, b: Tensor) -> Tensor:
        """Block-diagonal ``B``: part p's delta only writes its own output slice.

        Shape: ``(M, P, D_part, R) -> (M, len(parts) * D_part, P * R)``.
        """
        m, n, part_dim, rank = b.shape
        full = b.new_zeros(m, len(self.parts), part_dim, n, rank)
        for j, slot in enumerate(self._slots):
            full[:, slot, :, j] = b[:, j]
        return full.reshape(m, len(self.parts) * part_dim, n * rank)

    def extra_repr(self) -> str:
        return f"parts={self.parts}, enabled={self.enabled}, " + super().extra_repr()
