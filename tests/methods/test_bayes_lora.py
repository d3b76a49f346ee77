"""Bayes-LoRA (paper appendix W): K-FAC Laplace posterior over LoRA factors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorae.errors import ConfigError
from lorae.lora import (
    ATTENTION,
    LoRAEnsembleFusedLinear,
    LoRAEnsembleLinear,
    LoRASpec,
    Projection,
    lora_layers,
)
from lorae.methods import BayesLoRA, kfac_factors, kron_sample
from tests.fixtures.models import TINY_BACKBONES

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


class _OneLayer(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        if fused:
            base = nn.Linear(4, 6)
            self.layer: LoRAEnsembleLinear = LoRAEnsembleFusedLinear(
                base, ("q", "k", "v"), ("q", "v"), 1, LoRASpec(rank=2, gain=1.0)
            )
        else:
            spec = LoRASpec(rank=2, alpha=3.0, gain=1.0)
            self.layer = LoRAEnsembleLinear(nn.Linear(4, 6), 1, spec)
        with torch.no_grad():
            self.layer.B.normal_()


@pytest.mark.parametrize("fused", [False, True])
def test_kfac_is_exact_for_one_example(fused: bool) -> None:
    """For one example the Fisher is ``vec(grad) vec(grad)^T`` = ``(a a^T) ⊗ (g g^T)``."""
    model = _OneLayer(fused)
    x, target = torch.randn(1, 4), torch.tensor([2])
    factors = kfac_factors(model, model.layer, [(x, target)], fisher="empirical")["layer"]
    loss = nn.functional.cross_entropy(model.layer(x), target, reduction="sum")
    loss.backward()
    layer = model.layer
    assert layer.A.grad is not None and layer.B.grad is not None
    grads = {"A": layer.A.grad[0].reshape(-1, 4)}
    b_grads = layer.B.grad[0].unbind(0) if fused else [layer.B.grad[0]]
    grads.update({f"B{p}": b for p, b in enumerate(b_grads)})
    assert sorted(factors) == sorted(grads)
    for block, grad in grads.items():
        a, g = factors[block]
        vec = grad.T.reshape(-1)
        torch.testing.assert_close(torch.kron(a, g), torch.outer(vec, vec), rtol=1e-4, atol=1e-6)


def _bayes(targets: tuple[Projection, ...] = ATTENTION, **kwargs: object) -> BayesLoRA:
    name, overrides = TINY_BACKBONES["timm_vit"]
    torch.manual_seed(0)
    model = BayesLoRA(
        C,
        name,
        lora=LoRASpec(rank=1, gain=1.0, targets=targets),
        pretrained=False,
        backbone_overrides=overrides,
        **kwargs,  # type: ignore[arg-type]
    )
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.B.normal_(0, 0.1)
    return model.eval()


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(4, 3, 16, 16, generator=generator), torch.arange(4) % C) for _ in range(n)]


def test_posterior_samples_have_the_fitted_mean_and_covariance() -> None:
    model = _bayes(num_members=4, targets=("o",), prior_precision=0.5)
    model.fit_posterior(_batches())
    assert bool(model.fitted)
    name = "model.blocks.1.attn.proj"
    layer = lora_layers(model.network.backbone)[name]
    samples = model.sample_lora(0, 6000)
    for block, drawn, mean in (
        ("A", samples[f"{name}.A"], layer.A[0]),  # (S, R=1, 16)
        ("B0", samples[f"{name}.B"], layer.B[0]),  # (S, 16, R=1)
    ):
        key = f"{name.replace('.', '__')}__{block}__"
        a = model.posterior.get_buffer(key + "a").double()
        g = model.posterior.get_buffer(key + "g").double()
        assert a.abs().sum() > 0 and g.abs().sum() > 0
        covariance = torch.linalg.inv(torch.kron(a, g) + 0.5 * torch.eye(a.shape[0] * g.shape[0]))
        vec = _column_vec(drawn.double())
        scale = covariance.diagonal().sqrt()
        torch.testing.assert_close(
            vec.mean(0), _column_vec(mean[None].double())[0], rtol=0, atol=float(0.1 * scale.max())
        )
        correlation = vec.T.cov() / torch.outer(scale, scale)
        torch.testing.assert_close(
            correlation, covariance / torch.outer(scale, scale), rtol=0, atol=0.1
        )


def test_members_are_fixed_posterior_samples_and_checkpointable() -> None:
    model = _bayes(num_members=5, member_chunk=2)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        map_logits = model(x)
    assert map_logits.shape == (5, 2, C)
    torch.testing.assert_close(map_logits[0], map_logits[4])  # unfitted: the MAP
    model.fit_posterior(_batches())
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (5, 2, C)
        assert not torch.allclose(logits[0], logits[1])
        torch.testing.assert_close(model(x), logits)  # same members on every call
        # Chunking does not change the members.
        model.member_chunk = 5
        torch.testing.assert_close(model(x), logits)
        fresh = _bayes(num_members=5, member_chunk=2)
        fresh.load_state_dict(model.state_dict())
        assert bool(fresh.fitted)
        torch.testing.assert_close(fresh(x), logits)


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="prior_precision"):
        _bayes(prior_precision=0.0)
    with pytest.raises(ConfigError, match="fisher"):
        _bayes(fisher="exact")
