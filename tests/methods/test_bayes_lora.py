"""Bayes-LoRA (paper appendix W): K-FAC Laplace over LoRA factors with the linearised
predictive, cross-checked against the original implementation (PyPI ``bayesian-lora``)."""

from __future__ import annotations

import copy
import inspect
from types import SimpleNamespace

import bayesian_lora
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from lorae.errors import ConfigError
from lorae.lora import LoRAEnsembleLinear, LoRASpec, lora_layers
from lorae.methods import BayesLoRA, kron_sample
from tests.fixtures.models import TINY_BACKBONES, tiny_inputs

C = 3


def _column_vec(w: torch.Tensor) -> torch.Tensor:
    """vec() stacking columns, for a batch ``(S, D_out, D_in) -> (S, D_out*D_in)``."""
    return w.transpose(-1, -2).reshape(w.shape[0], -1)


def test_kron_sample_is_the_bayesian_linear_regression_posterior() -> None:
    """One linear output with Gaussian noise: K-FAC is exact and the posterior closed-form."""
    generator = torch.Generator().manual_seed(0)
    n, d, sigma, tau = 40, 3, 0.5, 2.0
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + sigma * torch.randn(
        n, generator=generator, dtype=torch.float64
    )
    precision = x.T @ x / sigma**2 + tau * torch.eye(d, dtype=torch.float64)
    covariance = torch.linalg.inv(precision)
    mean = covariance @ x.T @ y / sigma**2
    # K-FAC statistics of a linear layer: inputs x, output gradients 1/sigma per sample.
    a = x.T @ x / n
    g = torch.tensor([[n / sigma**2]], dtype=torch.float64)
    samples = kron_sample(mean[None], a, g, tau, 200_000, generator)[:, 0]  # (S, d)
    torch.testing.assert_close(samples.mean(0), mean, rtol=0, atol=3e-3)
    torch.testing.assert_close(samples.T.cov(), covariance, rtol=0.03, atol=1e-4)


def test_kron_sample_covariance_is_the_kronecker_posterior() -> None:
    generator = torch.Generator().manual_seed(1)
    d_out, d_in, tau = 2, 3, 0.7
    fa = torch.randn(d_in, d_in, generator=generator, dtype=torch.float64)
    fg = torch.randn(d_out, d_out, generator=generator, dtype=torch.float64)
    a, g = fa @ fa.T, fg @ fg.T
    mean = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    samples = kron_sample(mean, a, g, tau, 200_000, generator)
    expected = torch.linalg.inv(torch.kron(a, g) + tau * torch.eye(d_out * d_in).double())
    torch.testing.assert_close(samples.mean(0), mean, rtol=0, atol=5e-3)
    torch.testing.assert_close(_column_vec(samples).T.cov(), expected, rtol=0, atol=0.015)


# ------------------------------------------------- cross-check against bayesian-lora (PyPI)

#: Tiny BERT (the paper's SST-2 family: separate q, k, v, o), no dropout: the package computes
#: its factors in train mode, lorae in eval mode; without dropout both are the same function.
BERT_NAME, BERT_OVERRIDES = TINY_BACKBONES["hf_bert"]
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
RANK, N_KFAC, THRESHOLD, S2 = 2, 4, 8, 1e-2  # hidden 16 >= 8: the wide sides are low-rank


class PeftStyleLoRA(nn.Module):
    """One of lorae's one-member LoRA layers written as PEFT writes it (``lora_A``, ``lora_B``
    ``nn.Linear`` modules), the form ``bayesian-lora`` hooks into."""

    def __init__(self, layer: LoRAEnsembleLinear) -> None:
        super().__init__()
        self.base, self.scale = layer.base, layer.scale
        self.lora_A = nn.Linear(layer.A.shape[-1], layer.rank, bias=False)
        self.lora_B = nn.Linear(layer.rank, layer.B.shape[1], bias=False)
        with torch.no_grad():
            self.lora_A.weight.copy_(layer.A[0])
            self.lora_B.weight.copy_(layer.B[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))


def _peft_mirror(network: nn.Module) -> nn.Module:
    mirror = copy.deepcopy(network)
    for name, layer in lora_layers(mirror).items():
        parent, _, child = name.rpartition(".")
        setattr(mirror.get_submodule(parent), child, PeftStyleLoRA(layer))
    return mirror


def _bert_bayes(rows: str = "last", lr_threshold: int = THRESHOLD) -> BayesLoRA:
    torch.manual_seed(0)
    model = BayesLoRA(
        C,
        BERT_NAME,
        num_members=4,
        prior_variance=S2,
        n_kfac=N_KFAC,
        lr_threshold=lr_threshold,
        kfac_rows=rows,  # type: ignore[arg-type]
        jacobian_batch=3,
        lora=LoRASpec(rank=RANK, gain=1.0),
        pretrained=False,
        backbone_overrides={**BERT_OVERRIDES, **NO_DROPOUT},
    )
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.B.normal_(0, 0.5)  # B = 0 would zero every gradient through the adapters
    return model.eval()


def _bert_batches() -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    return [(tiny_inputs("hf_bert", 4, seed=s), torch.arange(4) % C) for s in range(3)]


def test_factors_and_predictive_equal_the_bayesian_lora_package() -> None:
    """Run lorae and ``bayesian-lora`` 0.0.6 (the paper's original implementation) on one tiny
    BERT: Kronecker factors (low-rank ones compared as ``B B^T``), and the linearised
    predictive's mean and covariance, agree to float32 rounding (rtol 1e-4)."""
    model = _bert_bayes()
    batches = _bert_batches()
    model.fit_posterior(batches)  # Monte Carlo labels from Generator().manual_seed(0)
    ours = model.factors()

    mirror = _peft_mirror(model.network)
    torch.manual_seed(0)  # the package draws its labels from the global generator
    theirs = bayesian_lora.calculate_kronecker_factors(
        mirror,
        lambda m, batch: m(batch[0])[0],
        batches,
        n_kfac=N_KFAC,
        lr_threshold=THRESHOLD,
        target_module_keywords=["lora"],
    )
    mirror.eval()
    layers = lora_layers(model.network.backbone)
    assert len(theirs) == 2 * len(layers) > 0

    def gram(factor: torch.Tensor, side: int) -> torch.Tensor:
        low_rank = side >= THRESHOLD
        assert factor.shape == ((side, N_KFAC) if low_rank else (side, side))
        return (factor @ factor.T if low_rank else factor).double()

    close = {"rtol": 1e-4, "atol": 1e-7}
    nonzero = 0
    for name in layers:
        for block, module in (("A", "lora_A"), ("B0", "lora_B")):
            (a, g), (pa, pg) = ours[name][block], theirs[f"backbone.{name}.{module}"]
            torch.testing.assert_close(gram(a, a.shape[0]), gram(pa, pa.shape[0]), **close)
            torch.testing.assert_close(gram(g, g.shape[0]), gram(pg, pg.shape[0]), **close)
            nonzero += int(gram(g, g.shape[0]).abs().sum() > 0)
    # The last token's query gets no gradient in the last block (only [CLS] is read there).
    assert nonzero >= len(layers)

    x = tiny_inputs("hf_bert", 5, seed=9)
    mean, variance = model.linearised(x)
    params = {n: p.detach() for n, p in mirror.named_parameters() if "lora" in n}
    jacobian, their_mean = jacrev(
        lambda p: (functional_call(mirror, p, (x,))[0],) * 2, has_aux=True
    )(params)
    chol = bayesian_lora.cholesky_decompose_small_factors(
        copy.deepcopy(theirs), THRESHOLD, "cpu", torch.float32
    )
    their_variance = bayesian_lora.variance(
        SimpleNamespace(input_ids=x["input_ids"]),
        jacobian,
        chol,
        torch.tensor(S2),
        C,
        RANK,
        N_KFAC,
        "cpu",
    )
    torch.testing.assert_close(mean, their_mean, rtol=1e-5, atol=1e-6)
    assert variance.shape == (5, C, C) and variance.diagonal(dim1=1, dim2=2).min() > 0
    torch.testing.assert_close(variance.float(), their_variance, rtol=1e-4, atol=1e-8)


def test_members_are_samples_of_the_linearised_predictive_and_checkpointable() -> None:
    model = _bert_bayes()
    x = tiny_inputs("hf_bert", 2, seed=3)
    with torch.no_grad():
        map_logits = model(x)
    assert map_logits.shape == (4, 2, C)
    torch.testing.assert_close(map_logits[0], map_logits[3])  # unfitted: the MAP
    model.fit_posterior(_bert_batches())
    with torch.no_grad(), torch.inference_mode():  # as Lightning's test loop
        logits = model(x)
    assert logits.shape == (4, 2, C) and not torch.allclose(logits[0], logits[1])
    torch.testing.assert_close(model(x), logits)  # the same members on every call
    model.jacobian_batch = 1  # chunking the Jacobian does not change the result
    torch.testing.assert_close(model(x), logits)
    fresh = _bert_bayes()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), logits)
    # Many samples: their mean and covariance are the linearised predictive's.
    mean, variance = model.linearised(x)
    model.num_members = 20_000
    samples = model.sample_logits(mean, variance).double()
    scale = variance.diagonal(dim1=1, dim2=2).sqrt().max()
    torch.testing.assert_close(samples.mean(0), mean.double(), rtol=0, atol=float(0.05 * scale))
    for b in range(2):
        torch.testing.assert_close(
            samples[:, b].T.cov(), variance[b], rtol=0.05, atol=float(0.05 * scale**2)
        )


def test_full_factor_variance_is_the_exact_kronecker_posterior() -> None:
    """Both sides full (the MiniLM case): the eigenbasis form is ``J (F_d ⊗ F_r + I/s2)^-1
    J^T`` written out densely, and the Woodbury form with ``F_d``'s Cholesky factor."""
    from lorae.methods.bayes_lora import (
        block_variance,
        block_variance_full,
        kron_decompose,
        stable_cholesky,
    )

    generator = torch.Generator().manual_seed(4)
    n, c, d, r, s2 = 3, 2, 5, 3, 0.3
    fd = torch.randn(d, d, generator=generator, dtype=torch.float64)
    fr = torch.randn(r, r, generator=generator, dtype=torch.float64)
    factor_d, factor_r = fd @ fd.T, fr @ fr.T
    jacobian = torch.randn(n, c, d, r, generator=generator, dtype=torch.float64)
    sigma = torch.linalg.inv(torch.kron(factor_d, factor_r) + torch.eye(d * r).double() / s2)
    flat = jacobian.flatten(-2)  # row-major vec, as kron(F_d, F_r) indexes it
    dense = flat @ sigma @ flat.mT
    ours = block_variance_full(jacobian, kron_decompose(factor_d, factor_r), s2)
    torch.testing.assert_close(ours, dense, rtol=1e-9, atol=1e-12)
    woodbury = block_variance(jacobian, stable_cholesky(factor_d), stable_cholesky(factor_r), s2)
    torch.testing.assert_close(ours, woodbury, rtol=1e-6, atol=1e-9)


def test_full_factors_build_no_dense_system(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no side low-rank (lr_threshold above every width), the predictive is computed
    without the ``(d r) x (d r)`` Woodbury system (torch.kron is never called), equals the
    Woodbury form with the full side's Cholesky factor, and follows a refitted posterior."""
    torch.manual_seed(0)
    model = BayesLoRA(
        C,
        BERT_NAME,
        num_members=4,
        prior_variance=10.0,  # a weak prior: the factors dominate
        n_kfac=N_KFAC,
        lr_threshold=10_000,  # every side full
        jacobian_batch=3,
        lora=LoRASpec(rank=RANK, gain=1.0),
        pretrained=False,
        backbone_overrides={**BERT_OVERRIDES, **NO_DROPOUT},
    ).eval()
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.B.normal_(0, 0.5)
    batches = _bert_batches()
    model.fit_posterior(batches[:1])
    x = tiny_inputs("hf_bert", 4, seed=9)

    def no_kron(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("the dense (d r) x (d r) system was built")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "kron", no_kron)
        _, first = model.linearised(x)
        model.fit_posterior(batches)  # new factors: the cached decompositions are redone
        _, variance = model.linearised(x)
    assert not torch.allclose(first, variance, rtol=1e-3)
    # the same posterior through the Woodbury form (Cholesky factor of the full side)
    from lorae.methods.bayes_lora import _block_jacobians, _key, block_variance, stable_cholesky

    layers = lora_layers(model.network.backbone)
    params = {
        f"{name}.{f}": getattr(layer, f).detach() for name, layer in layers.items() for f in "AB"
    }
    jacobians, _ = jacrev(
        lambda p: (model.network.head(functional_call(model.network.backbone, p, (x,)))[0],) * 2,
        has_aux=True,
    )(params)
    expected = torch.zeros_like(variance)
    for name, layer in layers.items():
        blocks = _block_jacobians(layer, jacobians[f"{name}.A"], jacobians[f"{name}.B"])
        for block, jacobian in blocks.items():
            a, g = (model.posterior.get_buffer(_key(name, block, f)) for f in ("a", "g"))
            large, small = (a, g) if block == "A" else (g, a)
            expected += block_variance(
                jacobian, stable_cholesky(large), stable_cholesky(small), 10.0
            )
    torch.testing.assert_close(variance, expected, rtol=1e-5, atol=1e-10)
    assert variance.diagonal(dim1=1, dim2=2).min() > 0


def test_kfac_rows_all_uses_every_token() -> None:
    last, every = _bert_bayes("last"), _bert_bayes("all")
    for model in (last, every):
        model.fit_posterior(_bert_batches())
    name = next(iter(lora_layers(last.network.backbone)))
    a_last = last.factors()[name]["B0"][0]  # (R, R): mean over batches of summed outer products
    a_all = every.factors()[name]["B0"][0]
    assert not torch.allclose(a_last, a_all)
    # "all" sums over 4 sequences x 7 tokens, "last" over 4 rows: the trace is larger.
    assert float(a_all.trace()) > float(a_last.trace())


def test_defaults_are_appendix_w() -> None:
    model = _bert_bayes()
    defaults = {
        k: v.default
        for k, v in inspect.signature(BayesLoRA.__init__).parameters.items()
        if v.default is not inspect.Parameter.empty
    }
    assert defaults["num_members"] == 512 and defaults["prior_variance"] == 1e-3
    assert defaults["n_kfac"] == 10 and defaults["kfac_rows"] == "last"
    assert model.prior_variance == S2


def test_bad_settings_are_config_errors() -> None:
    name, overrides = TINY_BACKBONES["timm_vit"]
    common = {"pretrained": False, "backbone_overrides": overrides}
    with pytest.raises(ConfigError, match="prior_variance"):
        BayesLoRA(C, name, prior_variance=0.0, lora=LoRASpec(rank=2), **common)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rank side"):
        BayesLoRA(C, name, lr_threshold=2, lora=LoRASpec(rank=2), **common)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="last_blocks"):
        BayesLoRA(C, name, lora=LoRASpec(rank=2, last_blocks=0), **common)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="kfac_rows"):
        BayesLoRA(C, name, kfac_rows="first", lora=LoRASpec(rank=2), **common)  # type: ignore[arg-type]


def test_a_checkpoint_with_other_factor_shapes_loads_its_map_and_refits() -> None:
    """Changing ``lr_threshold`` (or ``n_kfac``) on a trained network: the factors' shapes
    differ, so the MAP weights load and the posterior is fitted again with the new settings."""
    written = _bert_bayes()
    with torch.no_grad():  # a MAP of its own, unlike any freshly built model's
        for layer in lora_layers(written).values():
            layer.B.add_(0.3)
    written.fit_posterior(_bert_batches())
    x = tiny_inputs("hf_bert", 2, seed=3)
    model = _bert_bayes(lr_threshold=100)  # hidden 16 < 100: every factor full now
    assert any(
        b.shape != model.posterior.get_buffer(n).shape for n, b in written.posterior.named_buffers()
    )
    model.load_state_dict(written.state_dict())
    assert not bool(model.fitted)
    with torch.no_grad():  # unfitted: every member is the checkpoint's MAP network
        torch.testing.assert_close(model(x)[0], written.network(x)[0])
    model.fit_posterior(_bert_batches())
    reference = _bert_bayes(lr_threshold=100)
    reference.load_state_dict(written.state_dict())
    reference.fit_posterior(_bert_batches())
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    # same shapes: a fitted posterior loads as it is
    again = _bert_bayes()
    again.load_state_dict(written.state_dict())
    assert bool(again.fitted)
    with torch.no_grad():
        torch.testing.assert_close(again(x), written(x))
