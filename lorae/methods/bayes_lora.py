"""Bayes-LoRA: a Kronecker-factored Laplace posterior over LoRA parameters with the linearised
predictive (paper appendix W, after Yang et al. 2024, "Bayesian low-rank adaptation for large
language models"; original implementation: the PyPI package ``bayesian-lora``).

The paper, appendix W: "Bayes-LoRA [...] fitting a Gaussian posterior around the maximum a
posteriori (MAP) estimate of the fine-tuned model. In practice, this means we first obtain a
standard LoRA fine-tuned network and then apply a Laplace approximation over its adapter
weights. To make this tractable at scale, Bayes-LoRA relies on a Kronecker-factored
approximation of the Hessian [...]. For MAP training, we follow the standard LoRA setup with a
learning rate of 5x10^-5, training for 3 epochs with batch size 16. The LoRA rank is set to 64
[...]. The prior variance is chosen as 10^-3 [...] the number of posterior samples (i.e.,
ensemble members) is fixed at 512. For the Kronecker-factored approximation, we use
n_kfac = 10."

lorae computes what ``bayesian-lora`` (0.0.6) computes, in its own code (the package needs
``nn.Linear`` LoRA modules, lorae's LoRA layers hold batched factors), and
``tests/methods/test_bayes_lora.py`` runs both on a tiny BERT and compares:

- **Kronecker factors** (``calculate_kronecker_factors``): every LoRA factor matrix is a
  layer of its own, as PEFT's ``lora_A`` (input ``x``, output ``h = A x``) and ``lora_B``
  (input ``h``, output ``B h``, scaled by ``alpha / R``). Per batch: labels drawn from the
  model's predictive (Monte Carlo Fisher), a mean-reduced cross-entropy, and at each factor the
  outer products of its inputs (``A``) and output gradients (``S``) summed over the batch, at
  one token per sequence (``kfac_rows: last``, the package's ``[:, -1]``). A factor side of at
  least ``lr_threshold`` is kept low-rank, ``(d, n_kfac)``, by the package's incremental SVD
  (and not divided by the number of batches, as in the package); smaller sides are full and
  averaged over batches.
- **Predictive** (``variance``): the linearised predictive, as the package and its paper:
  logits ``f(x) ~ N(f_MAP(x), J Sigma J^T)`` with ``J`` the Jacobian of the logits with respect
  to the LoRA factors at the MAP and ``Sigma = (F + I / s2)^-1`` applied by Woodbury,
  ``s2 J J^T - s2^2 (J U) (I + s2 U^T U)^-1 (J U)^T`` with ``U = B ⊗ L`` (``B`` the low-rank
  large factor, ``L`` the Cholesky factor of the small one). The S members are S samples of
  these logits. Why logits and not weights: it is the published method; sampling 512 weight
  settings would cost 512 backbone passes per batch where the linearised predictive costs one
  Jacobian (C backward passes), and with a low-rank factor the weight posterior has no cheap
  square root.

Where lorae differs from the package, and why:

- Factors are computed in eval mode (the package switches to train mode, so dropout masks
  enter its Fisher): the fitted posterior is then the same whenever it is fitted.
- A fused ``qkv`` projection (timm/torchvision ViT) has one stacked down projection
  ``(P*R, D_in)``: its K-FAC block has a ``(P*R)^2`` output factor (PEFT would hold P separate
  ``lora_A``); BERT's separate q, k, v (the paper's SST-2 setting) match the package exactly.
- Where the non-rank side of a factor is below ``lr_threshold`` too (tiny test models, and
  all-MiniLM-L6-v2: width 384 < 512), the package has no formula (``calc_M`` asserts a
  low-rank side); lorae then computes the exact term in the factors' eigenbases
  (:func:`block_variance_full`), the same value as Woodbury with that side's Cholesky factor
  as ``B`` but without a ``(d r) x (d r)`` system (24,576 square for MiniLM at rank 64: 20 GB
  of memory and hours per test set).
- The package's ``[:, -1]`` is the prediction token of a causal LM; for an encoder it is the
  last position, which in a right-padded batch is padding for all but the longest sequences.
  ``kfac_rows: last`` keeps the published behaviour, ``all`` (every token, K-FAC "expand") is
  lorae's extension.

When the posterior is fitted: ``ModelCheckpoint`` saves during training, before any
post-training step could fit it. So the posterior is fitted lazily, by the
:class:`LaplacePosterior` callback at the start of ``test``/``predict``/``validate`` (outside
``fit``) whenever the loaded weights have none, from the data module's training split, and
stored in the method's buffers (part of every later checkpoint). Starting to train again
discards it. Validation during ``fit`` evaluates the MAP network, repeated as S members. A
checkpoint whose factors have other shapes (another ``n_kfac`` or ``lr_threshold``) loads its
MAP weights and fits the posterior again with the current settings.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader

from lorae.backbones.base import Inputs, Pretrained
from lorae.errors import ConfigError
from lorae.lora import LoRAEnsembleFusedLinear, LoRAEnsembleLinear, LoRASpec, lora_layers
from lorae.methods.lora_ensemble import DEFAULT_LORA, LoRANetworkMethod
from lorae.methods.registry import register_method

#: Which token rows of a LoRA layer's input enter the K-FAC factors: the last position of each
#: sequence (the package's ``[:, -1]``) or all of them.
KFACRows = Literal["last", "all"]
#: ``{layer name: {block: (activation factor, output-gradient factor)}}``
Factors = dict[str, dict[str, tuple[Tensor, Tensor]]]

Decomposition = tuple[Tensor, Tensor, Tensor, Tensor]


def kron_decompose(a: Tensor, g: Tensor) -> Decomposition:
    """Eigendecompositions ``(l_A, U_A, l_G, U_G)`` of both Kronecker factors (float64)."""
    l_a, u_a = torch.linalg.eigh(a.double())
    l_g, u_g = torch.linalg.eigh(g.double())
    # Eigenvalues of PSD factors can come out slightly negative in floating point.
    return l_a.clamp_min(0), u_a, l_g.clamp_min(0), u_g


def kron_transform(
    mean: Tensor, decomposition: Decomposition, prior_precision: float, z: Tensor
) -> Tensor:
    """Map standard normal ``z`` to samples of ``N(mean, (A ⊗ G + tau I)^-1)``.

    ``vec`` stacks columns, so ``A`` acts on the input axis and ``G`` on the output axis.
    With ``A = U_A diag(l_A) U_A^T`` and ``G = U_G diag(l_G) U_G^T``, a sample is
    ``mean + U_G (Z / sqrt(l_G l_A^T + tau)) U_A^T``: exact, in ``O(D_out^3 + D_in^3)``.

    Shape:
        mean ``(D_out, D_in)``, z ``(S, D_out, D_in)`` -> ``(S, D_out, D_in)``
    """
    l_a, u_a, l_g, u_g = decomposition
    scale = (l_g[:, None] * l_a[None, :] + prior_precision).rsqrt()
    noise = u_g @ (z.to(u_g) * scale) @ u_a.T
    return mean + noise.to(mean)


def kron_sample(
    mean: Tensor,
    a: Tensor,
    g: Tensor,
    prior_precision: float,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``num_samples`` samples of ``N(mean, (A ⊗ G + tau I)^-1)`` (see :func:`kron_transform`).

    Shape:
        mean ``(D_out, D_in)``, a ``(D_in, D_in)``, g ``(D_out, D_out)`` -> ``(S, D_out, D_in)``
    """
    z = torch.randn(num_samples, *mean.shape, generator=generator, dtype=torch.float64)
    return kron_transform(mean, kron_decompose(a, g), prior_precision, z.to(mean.device))


def incremental_svd(factor: Tensor, rows: Tensor, n_kfac: int) -> Tensor:
    """Add ``rows`` to a low-rank factor ``B`` (``B B^T`` approximates the sum of the rows'
    outer products) and truncate to rank ``n_kfac``, as ``bayesian_lora.kfac.incremental_svd``.

    Shape:
        factor ``(d, n_kfac)``, rows ``(N, d)`` -> ``(d, n_kfac)`` (float64)
    """
    stacked = torch.hstack((factor.double(), rows.double().T))
    u, s, _ = torch.linalg.svd(stacked, full_matrices=False)
    return u[:, :n_kfac] * s[:n_kfac]


def stable_cholesky(matrix: Tensor, eps: float = 1e-8, tries: int = 1000) -> Tensor:
    """Cholesky factor of a PSD matrix with the package's growing jitter
    (``K (1 + e I) + e I``, ``e`` = 1e-8 * 1.1^i)."""
    eye = torch.eye(matrix.shape[-1], dtype=torch.float64, device=matrix.device)
    k = matrix.double()
    for i in range(tries):
        jitter = eps * 1.1**i
        factor, info = torch.linalg.cholesky_ex(k * (1 + jitter * eye) + jitter * eye)
        if int(info) == 0:
            return factor
    raise ValueError("Could not compute a Cholesky factor of a Kronecker factor.")


def _part_rows(layer: LoRAEnsembleLinear) -> list[slice]:
    """Output rows of each enabled part (all rows for a plain layer)."""
    if not isinstance(layer, LoRAEnsembleFusedLinear):
        return [slice(None)]
    size = layer.base.out_features // len(layer.parts)
    return [slice(slot * size, (slot + 1) * size) for slot in layer._slots]


def _b_parts(layer: LoRAEnsembleLinear, factors: Tensor) -> list[Tensor]:
    """Each part's up projection ``(D_part, R)`` of member 0 (``factors`` shaped like B)."""
    if isinstance(layer, LoRAEnsembleFusedLinear):
        return list(factors[0].unbind(0))
    return [factors[0]]


def block_sides(layer: LoRAEnsembleLinear) -> dict[str, tuple[int, int]]:
    """``{block: (input side, output side)}`` of every K-FAC block of a LoRA layer: ``A`` (the
    stacked down projection, ``D_in -> P*R``) and ``B0 .. B{P-1}`` (each part's up projection,
    ``R -> D_part``)."""
    rank, parts = layer.rank, len(_part_rows(layer))
    d_part = _b_parts(layer, layer.B)[0].shape[0]
    sides = {"A": (layer.base.in_features, parts * rank)}
    sides.update({f"B{p}": (rank, d_part) for p in range(parts)})
    return sides


class _Accumulator:
    """Running K-FAC factor of one side: the sum of outer products, or a low-rank factor."""

    def __init__(self, side: int, n_kfac: int | None, lr_threshold: int) -> None:
        self.low_rank = n_kfac is not None and side >= lr_threshold
        self.n_kfac = n_kfac
        self.value: Tensor | None = None

    def add(self, rows: Tensor) -> None:
        if self.low_rank:
            assert self.n_kfac is not None
            start = self.value
            if start is None:
                start = rows.new_zeros(rows.shape[1], self.n_kfac, dtype=torch.float64)
            self.value = incremental_svd(start, rows, self.n_kfac)
        else:
            outer = rows.T @ rows
            self.value = outer if self.value is None else self.value + outer

    def result(self, batches: int) -> Tensor:
        assert self.value is not None
        # As the package: full factors are averaged over batches, low-rank ones are not.
        return self.value if self.low_rank else self.value / batches


def _select(rows: KFACRows, t: Tensor) -> Tensor:
    """The rows entering the factors: ``(N, D)`` from ``(B, T, D)`` (or ``(B, D)``)."""
    if t.dim() == 2:
        return t
    if rows == "last":
        return t[:, -1]
    return t.reshape(-1, t.shape[-1])


def kfac_factors(
    model: nn.Module,
    logits_fn: Callable[[Inputs], Tensor],
    batches: Iterable[tuple[Inputs, Tensor]],
    n_kfac: int | None = 10,
    lr_threshold: int = 512,
    rows: KFACRows = "last",
    generator: torch.Generator | None = None,
) -> Factors:
    """K-FAC factors of every LoRA factor matrix of ``model`` (one member), computed as
    ``bayesian_lora.calculate_kronecker_factors`` (module docstring).

    Args:
        model: holds one-member LoRA layers (:func:`lorae.lora.lora_layers`).
        logits_fn: ``inputs -> (B, C)`` logits through ``model``.
        batches: ``(inputs, target)`` pairs (the training data; targets unused: the labels
            are drawn from the model, the Monte Carlo Fisher).
        n_kfac: rank of the low-rank factors (``None``: all factors full).
        lr_threshold: a factor side of at least this size is kept low-rank.
        rows: ``"last"`` (each sequence's last position, as the package) or ``"all"``.
        generator: random source of the Monte Carlo labels (drawn on the CPU).

    Returns:
        ``{layer name: {block: (activation factor, output-gradient factor)}}`` with blocks
        ``A`` (input ``D_in``, output ``P*R``) and ``B0..`` (input ``R``, output ``D_part``);
        a factor is ``(d, d)`` when full, ``(d, n_kfac)`` when low-rank.
    """
    layers = lora_layers(model)
    if not layers or any(layer.num_members != 1 for layer in layers.values()):
        raise ConfigError("K-FAC Laplace needs a model with one-member LoRA layers.")
    captured: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name: str) -> Any:
        def capture(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            captured[name] = (args[0].detach(), output)

        return capture

    sums = {
        name: {
            block: (
                _Accumulator(d_in, n_kfac, lr_threshold),
                _Accumulator(d_out, n_kfac, lr_threshold),
            )
            for block, (d_in, d_out) in block_sides(layer).items()
        }
        for name, layer in layers.items()
    }
    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    count = 0
    try:
        for inputs, _ in batches:
            captured.clear()
            logits = logits_fn(inputs).float()
            probs = logits.detach().softmax(-1)
            target = torch.multinomial(probs.cpu(), 1, generator=generator).view(-1)
            loss = F.cross_entropy(logits, target.to(logits.device), reduction="mean")
            names = list(captured)
            grads = torch.autograd.grad(loss, [captured[n][1] for n in names])
            for name, grad in zip(names, grads, strict=True):
                _accumulate(layers[name], captured[name][0], grad, sums[name], rows)
            count += 1
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ConfigError("Bayes-LoRA needs at least one training batch to fit its posterior.")
    return {
        name: {block: (a.result(count), g.result(count)) for block, (a, g) in blocks.items()}
        for name, blocks in sums.items()
    }


@torch.no_grad()
def _accumulate(
    layer: LoRAEnsembleLinear,
    x: Tensor,
    grad_out: Tensor,
    sums: dict[str, tuple[_Accumulator, _Accumulator]],
    rows: KFACRows,
) -> None:
    """Add one batch to every block of ``layer``: inputs and output gradients of PEFT's
    ``lora_A`` (``x -> h = A x``) and ``lora_B`` (``h -> B h``, output scaled by alpha/R)."""
    x = _select(rows, x).float()
    grad_out = _select(rows, grad_out).float()
    rank = layer.rank
    hidden = x @ layer.down_projection()[0].T.float()  # (N, P*R)
    grad_hidden = []
    for p, (out_rows, b) in enumerate(
        zip(_part_rows(layer), _b_parts(layer, layer.B), strict=True)
    ):
        g_part = layer.scale * grad_out[:, out_rows]  # gradient at lora_B's output, (N, D_part)
        grad_hidden.append(g_part @ b.float())  # (N, R)
        a_acc, g_acc = sums[f"B{p}"]
        a_acc.add(hidden[:, p * rank : (p + 1) * rank])
        g_acc.add(g_part)
    a_acc, g_acc = sums["A"]
    a_acc.add(x)
    g_acc.add(torch.cat(grad_hidden, dim=1))


def block_variance(jacobian: Tensor, large: Tensor, small: Tensor, prior_variance: float) -> Tensor:
    """One block's term of the linearised predictive covariance, ``J Sigma J^T`` with
    ``Sigma = (B B^T ⊗ L L^T + I / s2)^-1`` by Woodbury (``bayesian_lora.variance``).

    Args:
        jacobian: logits' Jacobian w.r.t. the block, non-rank side first ``(N, C, d, r)``.
        large: ``B`` with ``B B^T`` the non-rank side's factor ``(d, k)``.
        small: ``L``, the Cholesky factor of the rank side's factor ``(r, r)``.
        prior_variance: s2.

    Shape:
        -> ``(N, C, C)`` (float64)
    """
    j = jacobian.double()
    flat = j.flatten(-2)
    first = prior_variance * flat @ flat.mT
    k, r = large.shape[1], small.shape[0]
    m = torch.eye(k * r, dtype=torch.float64, device=j.device) + prior_variance * torch.kron(
        large.mT @ large, small.mT @ small
    )
    projected = (large.mT @ j @ small).flatten(-2)  # (N, C, k*r)
    second = prior_variance**2 * projected @ torch.linalg.solve(m, projected.mT)
    return first - second


def block_variance_full(
    jacobian: Tensor, decomposition: Decomposition, prior_variance: float
) -> Tensor:
    """One block's ``J Sigma J^T`` with ``Sigma = (F_d ⊗ F_r + I / s2)^-1`` for *full*
    factors on both sides, exactly, in their eigenbases: with ``F_d = U diag(l) U^T`` and
    ``F_r = V diag(m) V^T``, ``J Sigma J^T = sum_ij P_ci P_c'i / (l_i m_j + 1 / s2)`` for
    ``P = U^T J V``. The same quantity as :func:`block_variance` with ``B`` the Cholesky factor
    of ``F_d``, but without its ``(d r) x (d r)`` system: for all-MiniLM-L6-v2 (width 384,
    below the package's ``lr_threshold`` of 512, so no side is low-rank) and rank 64 that
    system is 24,576 x 24,576 in float64, 4.8 GB per copy, solved per block and per
    Jacobian chunk, where this costs ``O(N C d r)`` with the decompositions computed once.

    Args:
        jacobian: logits' Jacobian w.r.t. the block, non-rank side first ``(N, C, d, r)``.
        decomposition: :func:`kron_decompose` of the non-rank side's factor ``F_d`` and the
            rank side's ``F_r``.
        prior_variance: s2.

    Shape:
        -> ``(N, C, C)`` (float64)
    """
    l_d, u_d, l_r, u_r = decomposition
    # The projection in the Jacobian's precision (float32 from the model: half the time of
    # float64, which made it most of the predictive's cost), the weighted sum in float64.
    dtype = jacobian.dtype
    projected = (u_d.mT.to(dtype) @ jacobian @ u_r.to(dtype)).double()  # (N, C, d, r)
    weights = 1.0 / (l_d[:, None] * l_r[None, :] + 1.0 / prior_variance)
    return torch.einsum("ncij,nkij,ij->nck", projected, projected, weights)


class LaplacePosterior(pl.Callback):
    """Fits the Bayes-LoRA posterior when evaluation starts without one (module docstring)."""

    def __init__(self, method: BayesLoRA) -> None:
        self.method = method

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.method.fitted.fill_(False)  # the MAP is about to change

    def _ensure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if bool(self.method.fitted):
            return
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if datamodule is None:
            raise ConfigError("Bayes-LoRA fits its posterior on the data module's train split.")
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        # In a fixed order, so that with the seeded Monte Carlo labels the posterior is the
        # same whenever it is fitted (after fit, or later from a checkpoint).
        ordered = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            shuffle=False,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
        )
        device = pl_module.device
        batches = (move_data_to_device(b, device) for b in ordered)
        limit = 1 if trainer.fast_dev_run else None  # type: ignore[attr-defined]
        with torch.inference_mode(False), torch.enable_grad():
            self.method.fit_posterior(batches, limit)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit":
            self._ensure(trainer, pl_module)


@register_method("bayes_lora")
class BayesLoRA(LoRANetworkMethod):
    """Laplace-approximated LoRA network with the linearised predictive; S samples of the
    predictive logits are the members (module docstring; paper appendix W).

    Args:
        num_classes: C (linked from the data module by the CLI).
        backbone: a registered backbone name.
        num_members: S, the predictive samples evaluated as members (paper: 512).
        prior_variance: s2 of the isotropic Gaussian prior on the LoRA factors (paper: 1e-3).
        n_kfac: rank of the low-rank Kronecker factors (paper: 10; ``None``: all full).
        lr_threshold: factor sides of at least this size are low-rank (the package's
            default, 512; the LoRA rank side must be smaller).
        kfac_rows: token rows entering the factors: ``"last"`` (as the package) or ``"all"``.
        fit_batches: use only the first k training batches to fit (``None``: all).
        jacobian_batch: samples per Jacobian computation (not the result). The
            reverse-mode Jacobian of a chunk runs each of its ``chunk * C`` outputs'
            backward through the whole chunk, so a chunk of k costs ``k * C`` backward
            passes per sample where 1 costs ``C``: on one CPU thread with all-MiniLM-L6-v2,
            16 sentences took 4.9 s at 1 and 14.3 s at 8 (1 is the default; larger chunks
            can pay off where per-call overhead dominates, e.g. on a GPU).
        sample_seed: seed of the Monte Carlo labels of the fit and of the predictive samples.
        lora: the LoRA network's options (:class:`~lorae.lora.LoRASpec`; paper: rank 64); it
            needs adapters, so ``last_blocks`` may not be 0.
        pretrained: ``True`` (download), ``False`` (random) or a local weights path.
        backbone_overrides: architecture arguments for the backbone constructor.

    Shape:
        inputs ``(B, ...)`` -> logits ``(1, B, C)`` in training, ``(S, B, C)`` in evaluation
    """

    fitted: Tensor

    def __init__(
        self,
        num_classes: int,
        backbone: str,
        num_members: int = 512,
        prior_variance: float = 1e-3,
        n_kfac: int | None = 10,
        lr_threshold: int = 512,
        kfac_rows: KFACRows = "last",
        fit_batches: int | None = None,
        jacobian_batch: int = 1,
        sample_seed: int = 0,
        lora: LoRASpec = DEFAULT_LORA,
        pretrained: Pretrained = True,
        backbone_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        if num_members < 1 or jacobian_batch < 1 or not prior_variance > 0:
            raise ConfigError(
                "Bayes-LoRA needs num_members >= 1, jacobian_batch >= 1, prior_variance > 0."
            )
        if (n_kfac is not None and n_kfac < 1) or lr_threshold < 1:
            raise ConfigError("Bayes-LoRA needs n_kfac >= 1 (or null) and lr_threshold >= 1.")
        if kfac_rows not in ("last", "all"):
            raise ConfigError(f"kfac_rows must be 'last' or 'all', got {kfac_rows!r}.")
        if lora.last_blocks == 0:
            raise ConfigError(
                "Bayes-LoRA needs LoRA adapters for its posterior: lora.last_blocks must be "
                "null or >= 1, not 0."
            )
        super().__init__(num_classes, backbone, num_members, lora, pretrained, backbone_overrides)
        self.prior_variance = prior_variance
        self.n_kfac = n_kfac
        self.lr_threshold = lr_threshold
        self.kfac_rows: KFACRows = kfac_rows
        self.fit_batches = fit_batches
        self.jacobian_batch = jacobian_batch
        self.sample_seed = sample_seed
        self.posterior = nn.Module()  # K-FAC factors, buffers "<layer>__<block>__a|g"
        for name, layer in lora_layers(self.network.backbone).items():
            for block, sides in block_sides(layer).items():
                rank_side = sides[1] if block == "A" else sides[0]
                if rank_side >= lr_threshold:
                    raise ConfigError(
                        f"Bayes-LoRA: the LoRA rank side ({rank_side}) of {name} must be below "
                        f"lr_threshold ({lr_threshold}); raise lr_threshold."
                    )
                for side, factor in zip(sides, ("a", "g"), strict=True):
                    columns = n_kfac if n_kfac is not None and side >= lr_threshold else side
                    shape = (side, columns)
                    self.posterior.register_buffer(_key(name, block, factor), torch.zeros(shape))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_load_state_dict_pre_hook(_refit_on_other_factor_shapes)

    def callbacks(self) -> list[pl.Callback]:
        return [LaplacePosterior(self)]

    def fit_posterior(
        self, batches: Iterable[tuple[Inputs, Tensor]], limit: int | None = None
    ) -> None:
        """Compute and store the K-FAC factors at the current (MAP) weights, from at most
        ``limit`` (else ``fit_batches``, else all) batches."""
        was_training = self.training
        self.eval()
        limit = limit if limit is not None else self.fit_batches
        generator = torch.Generator().manual_seed(self.sample_seed)
        factors = kfac_factors(
            self.network.backbone,
            lambda x: self.network(x)[0],
            itertools.islice(batches, limit),
            self.n_kfac,
            self.lr_threshold,
            self.kfac_rows,
            generator,
        )
        with torch.no_grad():
            for name, blocks in factors.items():
                for block, pair in blocks.items():
                    for factor, value in zip(("a", "g"), pair, strict=True):
                        self.posterior.get_buffer(_key(name, block, factor)).copy_(value)
            self.fitted.fill_(True)
        self.train(was_training)

    def factors(self) -> Factors:
        """The stored K-FAC factors, ``{layer: {block: (activation, output gradient)}}``."""
        return {
            name: {
                block: (
                    self.posterior.get_buffer(_key(name, block, "a")),
                    self.posterior.get_buffer(_key(name, block, "g")),
                )
                for block in block_sides(layer)
            }
            for name, layer in lora_layers(self.network.backbone).items()
        }

    def linearised(self, x: Inputs) -> tuple[Tensor, Tensor]:
        """Mean and covariance of the linearised predictive logits (module docstring).

        Shape:
            inputs ``(B, ...)`` -> mean ``(B, C)``, covariance ``(B, C, C)`` (float64)
        """
        batch = _batch_size(x)
        means, variances = [], []
        with torch.inference_mode(False), torch.enable_grad():
            for start in range(0, batch, self.jacobian_batch):
                chunk = _rows(x, start, start + self.jacobian_batch)
                mean, variance = self._linearised(chunk)
                means.append(mean)
                variances.append(variance)
        return torch.cat(means), torch.cat(variances)

    def _linearised(self, x: Inputs) -> tuple[Tensor, Tensor]:
        layers = lora_layers(self.network.backbone)
        params = {
            f"{name}.{factor}": getattr(layer, factor).detach()
            for name, layer in layers.items()
            for factor in ("A", "B")
        }

        def logits(p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            features = functional_call(self.network.backbone, p, (x,))
            out = self.network.head(features)[0]  # the MAP head (not in the posterior)
            return out, out

        jacobians, mean = jacrev(logits, has_aux=True)(params)
        n, c = mean.shape
        variance = mean.new_zeros(n, c, c, dtype=torch.float64)
        prepared = self._prepared_factors()
        for name, layer in layers.items():
            blocks = _block_jacobians(layer, jacobians[f"{name}.A"], jacobians[f"{name}.B"])
            for block, jacobian in blocks.items():
                kind, parts = prepared[(name, block)]
                if kind == "full":
                    variance += block_variance_full(jacobian, parts, self.prior_variance)
                else:
                    large, small = parts
                    variance += block_variance(jacobian, large, small, self.prior_variance)
        return mean.detach(), variance.detach()

    def _prepared_factors(self) -> dict[tuple[str, str], tuple[str, Any]]:
        """Per ``(layer, block)`` what its predictive term needs, computed once per fitted
        posterior (and device): ``("full", eigendecompositions)`` where the non-rank side is
        full (:func:`block_variance_full`), else ``("low_rank", (B, L))`` with ``L`` the rank
        side's Cholesky factor (:func:`block_variance`, the package's Woodbury form)."""
        key = tuple((b.data_ptr(), b._version, str(b.device)) for b in self.posterior.buffers())
        cached = getattr(self, "_prepared_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        prepared: dict[tuple[str, str], tuple[str, Any]] = {}
        for name, layer in lora_layers(self.network.backbone).items():
            for block in block_sides(layer):
                a, g = (
                    self.posterior.get_buffer(_key(name, block, f)).double() for f in ("a", "g")
                )
                large, small = (a, g) if block == "A" else (g, a)
                if large.shape[0] == large.shape[1] and not self._low_rank(large.shape[0]):
                    prepared[(name, block)] = ("full", kron_decompose(large, small))
                else:
                    prepared[(name, block)] = ("low_rank", (large, stable_cholesky(small)))
        self._prepared_cache = (key, prepared)
        return prepared

    def _low_rank(self, side: int) -> bool:
        return self.n_kfac is not None and side >= self.lr_threshold

    def sample_logits(self, mean: Tensor, variance: Tensor) -> Tensor:
        """S seeded samples of ``N(mean, variance)`` per sample: the members.

        Shape:
            mean ``(B, C)``, variance ``(B, C, C)`` -> ``(S, B, C)``
        """
        values, vectors = torch.linalg.eigh(variance.double())
        root = vectors * values.clamp_min(0).sqrt().unsqueeze(-2)  # (B, C, C)
        generator = torch.Generator().manual_seed(self.sample_seed)
        noise = torch.randn(self.num_members, *mean.shape, generator=generator, dtype=torch.float64)
        noise = torch.einsum("bij,sbj->sbi", root, noise.to(root.device))
        return (mean.double() + noise).to(mean.dtype)

    def forward(self, x: Inputs) -> Tensor:
        if self.training:
            return self.network(x)  # (1, B, C): MAP training
        if not bool(self.fitted):
            logits = self.network(x)  # validation during fit: the MAP, as every member
            return logits.expand(self.num_members, *logits.shape[1:])
        return self.sample_logits(*self.linearised(x))  # (S, B, C)


def _refit_on_other_factor_shapes(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
) -> None:
    """Load a checkpoint whose K-FAC factors have other shapes (written with another
    ``n_kfac`` or ``lr_threshold``) by dropping its factors: the MAP weights load, the
    posterior is marked unfitted, and :class:`LaplacePosterior` fits it again with the current
    settings when evaluation starts. Without this, changing the posterior's settings on a
    trained network ended in ``size mismatch`` errors."""
    assert isinstance(module, BayesLoRA)
    ours = dict(module.posterior.named_buffers())
    theirs = {
        key[len(prefix + "posterior.") :]: key
        for key in state_dict
        if key.startswith(prefix + "posterior.")
    }
    if all(
        name in theirs and state_dict[theirs[name]].shape == buffer.shape
        for name, buffer in ours.items()
    ):
        return
    for key in theirs.values():
        del state_dict[key]
    for name, buffer in ours.items():
        state_dict[prefix + "posterior." + name] = torch.zeros_like(buffer)
    fitted = state_dict.get(prefix + "fitted")
    if fitted is not None and bool(fitted):
        rank_zero_info(
            "Bayes-LoRA: the checkpoint's posterior was fitted with other n_kfac / "
            "lr_threshold settings; it is fitted again with the current ones."
        )
    state_dict[prefix + "fitted"] = torch.zeros((), dtype=torch.bool)


def _block_jacobians(layer: LoRAEnsembleLinear, jac_a: Tensor, jac_b: Tensor) -> dict[str, Tensor]:
    """Per K-FAC block, the logits' Jacobian with its non-rank side first: ``A`` as
    ``(N, C, D_in, P*R)``, ``Bp`` as ``(N, C, D_part, R)``."""
    n, c = jac_a.shape[:2]
    blocks = {"A": jac_a.reshape(n, c, -1, jac_a.shape[-1]).mT}
    parts = len(_part_rows(layer))
    b = jac_b.reshape(n, c, parts, *jac_b.shape[-2:])
    blocks.update({f"B{p}": b[:, :, p] for p in range(parts)})
    return blocks


def _batch_size(x: Inputs) -> int:
    return int((x if isinstance(x, Tensor) else next(iter(x.values()))).shape[0])


def _rows(x: Inputs, start: int, stop: int) -> Inputs:
    """Samples ``start:stop``, as ordinary tensors (usable by autograd under inference mode)."""
    if isinstance(x, Tensor):
        return x[start:stop].clone()
    return {k: v[start:stop].clone() for k, v in x.items()}


def _key(name: str, block: str, factor: str) -> str:
    return f"{name.replace('.', '__')}__{block}__{factor}"
