"""Bayes-LoRA: a Kronecker-factored Laplace posterior over LoRA parameters (paper appendix W,
after Yang et al. 2024, "Bayesian low-rank adaptation for large language models").

A single LoRA network (a one-member :class:`LoRAEnsemble`) is trained as usual (the MAP).
The posterior over its LoRA factors is ``N(MAP, (F + tau I)^-1)`` with the Fisher ``F``
approximated per factor matrix by K-FAC, ``F ≈ A ⊗ G`` (Martens and Grosse 2015; K-FAC
"expand" over tokens, Eschenhagen et al. 2023): ``A`` the mean outer product of the factor's
inputs, ``G`` the summed outer product of the loss gradients at its outputs, with labels drawn
from the model (Monte Carlo Fisher, default) or the true labels (empirical Fisher). At test
time S posterior samples are the members; the head stays at its MAP value.

Why not laplace-torch: it installs here (0.3), but its K-FAC backends (ASDL, BackPACK,
curvlinops) only factor ``nn.Linear``/``nn.Conv2d`` modules, and the LoRA factors live in the
batched LoRA layers, so the factors are computed here from each LoRA layer's inputs and output
gradients (:func:`kfac_factors`), and tested against closed-form posteriors.

When the posterior is fitted: ``ModelCheckpoint`` saves during training, before any
post-training step could fit it. So the posterior is fitted lazily, by the
:class:`LaplacePosterior` callback at the start of ``test``/``predict``/``validate`` (outside
``fit``) whenever the loaded weights have none, from the data module's training split, and
stored in the method's buffers (part of every later checkpoint). Starting to train again
discards it. Validation during ``fit`` evaluates the MAP network, repeated as S members.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from lorae.backbones.base import Inputs, Pretrained
from lorae.errors import ConfigError
from lorae.lora import LoRAEnsembleFusedLinear, LoRAEnsembleLinear, LoRASpec, lora_layers
from lorae.methods.base import repeat_members
from lorae.methods.lora_ensemble import DEFAULT_LORA, LoRANetworkMethod
from lorae.methods.registry import register_method

Fisher = Literal["mc", "empirical"]


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


def _factor_blocks(layer: LoRAEnsembleLinear) -> list[str]:
    parts = len(layer.enabled) if isinstance(layer, LoRAEnsembleFusedLinear) else 1
    return ["A", *(f"B{p}" for p in range(parts))]


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


@torch.no_grad()
def _accumulate(
    layer: LoRAEnsembleLinear, x: Tensor, grad_out: Tensor, sums: dict[str, list[Tensor]]
) -> None:
    """Add one batch's K-FAC statistics of ``layer`` to ``sums[block] = [sum aa^T, sum gg^T,
    rows]``. ``x`` are the layer's inputs, ``grad_out`` the loss gradients at its output."""
    x = x.reshape(-1, x.shape[-1]).float()
    grad_out = grad_out.reshape(-1, grad_out.shape[-1]).float()
    rank = layer.rank
    hidden = x @ layer.down_projection()[0].T.float()  # (N, P*R)
    grad_hidden = []
    for p, (rows, b) in enumerate(zip(_part_rows(layer), _b_parts(layer, layer.B), strict=True)):
        g_part = grad_out[:, rows]  # (N, D_part)
        a_part = layer.scale * hidden[:, p * rank : (p + 1) * rank]  # (N, R)
        grad_hidden.append(layer.scale * g_part @ b.float())  # (N, R)
        _add(sums, f"B{p}", a_part, g_part)
    _add(sums, "A", x, torch.cat(grad_hidden, dim=1))


def _add(sums: dict[str, list[Tensor]], block: str, a: Tensor, g: Tensor) -> None:
    stats = [a.T @ a, g.T @ g, a.new_tensor(float(a.shape[0]))]
    if block in sums:
        for total, value in zip(sums[block], stats, strict=True):
            total += value
    else:
        sums[block] = stats


def kfac_factors(
    model: nn.Module,
    logits_fn: Any,
    batches: Iterable[tuple[Inputs, Tensor]],
    fisher: Fisher = "mc",
    generator: torch.Generator | None = None,
) -> dict[str, dict[str, tuple[Tensor, Tensor]]]:
    """K-FAC factors ``(A, G)`` of every LoRA factor matrix of ``model`` (one member).

    Args:
        model: holds one-member LoRA layers (:func:`lorae.lora.lora_layers`).
        logits_fn: ``inputs -> (B, C)`` logits through ``model``.
        batches: ``(inputs, target)`` pairs (the training data).
        fisher: ``"mc"``: one label per sample drawn from the model's predictive (an unbiased
            estimate of the Fisher = GGN for cross-entropy); ``"empirical"``: the true labels.
        generator: random source of the Monte Carlo labels.

    Returns:
        ``{layer name: {"A": (A, G), "B0": (A, G), ...}}``: block ``A`` is the stacked down
        projection ``(P*R, D_in)``, block ``Bp`` part p's up projection ``(D_part, R)``; the
        ``A`` factor is the mean input outer product over all rows (tokens), ``G`` the sum of
        the output-gradient outer products over the whole data.
    """
    layers = lora_layers(model)
    if not layers or any(layer.num_members != 1 for layer in layers.values()):
        raise ConfigError("K-FAC Laplace needs a model with one-member LoRA layers.")
    captured: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name: str) -> Any:
        def capture(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            captured[name] = (args[0].detach(), output)

        return capture

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    sums: dict[str, dict[str, list[Tensor]]] = {name: {} for name in layers}
    try:
        for inputs, target in batches:
            captured.clear()
            logits = logits_fn(inputs).float()
            if fisher == "mc":
                probs = logits.detach().softmax(-1)
                target = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1)
            loss = F.cross_entropy(logits, target.to(logits.device), reduction="sum")
            names = list(captured)
            grads = torch.autograd.grad(loss, [captured[n][1] for n in names])
            for name, grad in zip(names, grads, strict=True):
                _accumulate(layers[name], captured[name][0], grad, sums[name])
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: {block: (aa / rows, gg) for block, (aa, gg, rows) in blocks.items()}
        for name, blocks in sums.items()
    }


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
    """Laplace-approximated LoRA network; S posterior samples are the members (module
    docstring).

    Args:
        num_classes: C (linked from the data module by the CLI).
        backbone: a registered backbone name.
        num_members: S, the posterior samples evaluated as members (paper: 512).
        prior_precision: tau of the isotropic Gaussian prior on the LoRA factors.
        fisher: ``"mc"`` (Monte Carlo Fisher, default) or ``"empirical"``.
        fit_batches: use only the first k training batches to fit (``None``: all).
        member_chunk: members evaluated per batched pass (bounds memory, not the result).
        sample_seed: seed of the Monte Carlo labels of the fit and of the posterior samples;
            member i is the same network for every test batch.
        lora: the LoRA network's options (:class:`~lorae.lora.LoRASpec`); it needs adapters,
            so ``last_blocks`` may not be 0.
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
        prior_precision: float = 1.0,
        fisher: Fisher = "mc",
        fit_batches: int | None = None,
        member_chunk: int = 16,
        sample_seed: int = 0,
        lora: LoRASpec = DEFAULT_LORA,
        pretrained: Pretrained = True,
        backbone_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        if num_members < 1 or member_chunk < 1 or prior_precision <= 0:
            raise ConfigError(
                "Bayes-LoRA needs num_members >= 1, member_chunk >= 1, prior_precision > 0."
            )
        if fisher not in ("mc", "empirical"):
            raise ConfigError(f"fisher must be 'mc' or 'empirical', got {fisher!r}.")
        if lora.last_blocks == 0:
            raise ConfigError(
                "Bayes-LoRA needs LoRA adapters for its posterior: lora.last_blocks must be "
                "null or >= 1, not 0."
            )
        super().__init__(num_classes, backbone, num_members, lora, pretrained, backbone_overrides)
        self.prior_precision = prior_precision
        self.fisher: Fisher = fisher
        self.fit_batches = fit_batches
        self.member_chunk = member_chunk
        self.sample_seed = sample_seed
        self.posterior = nn.Module()  # K-FAC factors, buffers "<layer>__<block>__a|g"
        for name, layer in lora_layers(self.network.backbone).items():
            for block, mean in _block_means(layer).items():
                d_out, d_in = mean.shape
                self.posterior.register_buffer(_key(name, block, "a"), torch.zeros(d_in, d_in))
                self.posterior.register_buffer(_key(name, block, "g"), torch.zeros(d_out, d_out))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._decompositions: dict[tuple[str, str], tuple[tuple[int, ...], Decomposition]] = {}

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
        limited = itertools.islice(batches, limit)
        generator = torch.Generator().manual_seed(self.sample_seed)
        factors = kfac_factors(
            self.network.backbone, lambda x: self.network(x)[0], limited, self.fisher, generator
        )
        with torch.no_grad():
            for name, blocks in factors.items():
                for block, (a, g) in blocks.items():
                    self.posterior.get_buffer(_key(name, block, "a")).copy_(a)
                    self.posterior.get_buffer(_key(name, block, "g")).copy_(g)
            self.fitted.fill_(True)
        self.train(was_training)

    def _decomposition(self, name: str, block: str) -> Decomposition:
        """Cached eigendecomposition of a block's factors (recomputed when they change)."""
        a = self.posterior.get_buffer(_key(name, block, "a"))
        g = self.posterior.get_buffer(_key(name, block, "g"))
        version = (a._version, g._version, a.data_ptr(), g.data_ptr())
        cached = self._decompositions.get((name, block))
        if cached is None or cached[0] != version:
            cached = (version, kron_decompose(a, g))
            self._decompositions[(name, block)] = cached
        return cached[1]

    @torch.no_grad()
    def sample_lora(self, first: int, count: int) -> dict[str, Tensor]:
        """Posterior samples ``first .. first+count-1`` of every LoRA factor, stacked as
        members: ``{"<layer>.A": (count, ...), "<layer>.B": (count, ...)}``.

        Member i draws its noise from its own seeded generator, so it is the same network on
        every call, whatever the chunking.
        """
        layers = lora_layers(self.network.backbone)
        means = {
            (name, block): mean
            for name, layer in layers.items()
            for block, mean in _block_means(layer).items()
        }
        noise: dict[tuple[str, str], list[Tensor]] = {key: [] for key in means}
        for i in range(first, first + count):
            generator = torch.Generator().manual_seed(self.sample_seed * 1_000_003 + i)
            for key, mean in means.items():
                shape = mean.shape
                noise[key].append(torch.randn(shape, generator=generator, dtype=torch.float64))
        samples: dict[str, Tensor] = {}
        for name, layer in layers.items():
            drawn = {
                block: kron_transform(
                    mean,
                    self._decomposition(name, block),
                    self.prior_precision,
                    torch.stack(noise[(name, block)]).to(mean.device),
                )
                for (layer_name, block), mean in means.items()
                if layer_name == name
            }
            samples[f"{name}.A"] = drawn.pop("A").reshape(count, *layer.A.shape[1:])
            b_parts = [drawn[f"B{p}"] for p in range(len(drawn))]
            fused = isinstance(layer, LoRAEnsembleFusedLinear)
            samples[f"{name}.B"] = torch.stack(b_parts, dim=1) if fused else b_parts[0]
        return samples

    def forward(self, x: Inputs) -> Tensor:
        if self.training:
            return self.network(x)  # (1, B, C): MAP training
        if not bool(self.fitted):
            logits = self.network(x)  # validation during fit: the MAP, as every member
            return logits.expand(self.num_members, *logits.shape[1:])
        chunks = []
        for first in range(0, self.num_members, self.member_chunk):
            count = min(self.member_chunk, self.num_members - first)
            params = self.sample_lora(first, count)
            features = functional_call(
                self.network.backbone, params, (repeat_members(x, count),)
            )  # (count*B, D)
            logits = self.network.head(features)[0]  # the MAP head, shared: (count*B, C)
            chunks.append(logits.reshape(count, -1, logits.shape[-1]))
        return torch.cat(chunks)  # (S, B, C)


def _block_means(layer: LoRAEnsembleLinear) -> dict[str, Tensor]:
    """The MAP matrix ``(D_out, D_in)`` of every K-FAC block of a one-member LoRA layer."""
    means = {"A": layer.down_projection()[0]}
    for p, b in enumerate(_b_parts(layer, layer.B)):
        means[f"B{p}"] = b
    return means


def _key(name: str, block: str, factor: str) -> str:
    return f"{name.replace('.', '__')}__{block}__{factor}"
