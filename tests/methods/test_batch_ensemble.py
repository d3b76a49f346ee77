"""BatchEnsemble / BatchEnsemble++ initialisation (paper appendix I.1, I.2): the drawn moments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorae.errors import ConfigError
from lorae.methods import BatchEnsemble, BatchEnsembleLinear
from tests.fixtures.models import TINY_BACKBONES

#: Appendix I.1: "r, s ~ N(1, σ²) ... We empirically set σ² = 0.02"; I.2: "centered around 0".
PAPER_VARIANCE = 0.02
MEANS = {"multiplicative": 1.0, "additive": 0.0}


def _factors(layer: BatchEnsembleLinear) -> torch.Tensor:
    return torch.cat([layer.r.detach().flatten(), layer.s.detach().flatten()]).double()


@pytest.mark.parametrize("variant", ["multiplicative", "additive"])
def test_factors_are_drawn_with_the_papers_mean_and_variance(variant: str) -> None:
    torch.manual_seed(0)
    layer = BatchEnsembleLinear(nn.Linear(256, 3 * 256), 3, 16, variant, PAPER_VARIANCE)  # type: ignore[arg-type]
    factors = _factors(layer)
    n = factors.numel()  # 16 * 3 * (256 + 256) = 24576 draws
    # sample mean: standard error sigma / sqrt(n); sample variance: sigma^2 sqrt(2 / (n - 1))
    assert abs(factors.mean().item() - MEANS[variant]) < 5 * math.sqrt(PAPER_VARIANCE / n)
    variance_tolerance = 5 * PAPER_VARIANCE * math.sqrt(2 / (n - 1))
    assert abs(factors.var().item() - PAPER_VARIANCE) < variance_tolerance
    # std ≈ 0.141, not the 0.02 a standard deviation of 0.02 would give
    assert 0.13 < factors.std().item() < 0.15


@pytest.mark.parametrize("variant", ["multiplicative", "additive"])
def test_the_method_defaults_to_the_papers_variance(variant: str) -> None:
    name, overrides = TINY_BACKBONES["timm_vit"]
    torch.manual_seed(0)
    model = BatchEnsemble(
        5,
        name,
        num_members=16,
        variant=variant,
        pretrained=False,
        backbone_overrides=overrides,  # type: ignore[arg-type]
    )
    layers = [m for m in model.modules() if isinstance(m, BatchEnsembleLinear)]
    factors = torch.cat([_factors(m) for m in layers])
    n = factors.numel()
    assert abs(factors.mean().item() - MEANS[variant]) < 5 * math.sqrt(PAPER_VARIANCE / n)
    assert abs(factors.var().item() - PAPER_VARIANCE) < 5 * PAPER_VARIANCE * math.sqrt(2 / (n - 1))


def test_init_variance_is_a_variance_not_a_standard_deviation() -> None:
    torch.manual_seed(0)
    layer = BatchEnsembleLinear(nn.Linear(128, 128), 1, 16, "additive", 0.25)
    assert abs(_factors(layer).std().item() - 0.5) < 0.02  # sqrt(0.25)
    zero = BatchEnsembleLinear(nn.Linear(4, 4), 1, 2, "multiplicative", 0.0)
    assert torch.equal(_factors(zero), torch.ones(2 * 4 + 2 * 4, dtype=torch.float64))
    with pytest.raises(ConfigError, match="init_variance"):
        BatchEnsembleLinear(nn.Linear(4, 4), 1, 2, "additive", -0.1)
