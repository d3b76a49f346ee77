"""Weight space as the paper shows it (appendix D, Figs. 3, 12-14) and the trajectory record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lorae.analysis import analyse_projection
from lorae.analysis.trajectory import (
    feature_indices,
    member_updates,
    trajectory_embedding,
)


def _weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    reference = torch.randn(20, 18, generator=generator, dtype=torch.float64)
    members = reference + 0.5 * torch.randn(3, 20, 18, generator=generator, dtype=torch.float64)
    return reference, members


def _abs_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.T @ b)


def test_top_16_singular_values_and_cosine_heatmaps_against_numpy() -> None:
    reference, members = _weights()
    report = analyse_projection(reference, members)  # k = 16 by default, as the paper
    u0, s0, _ = np.linalg.svd(reference.numpy())
    us, ss = zip(*[np.linalg.svd(m.numpy())[:2] for m in members], strict=True)
    np.testing.assert_allclose(report.top_singular_values.numpy(), np.stack(ss)[:, :16])
    expected_pretrained = np.mean([_abs_cos(u0[:, :16], u[:, :16]) for u in us], axis=0)
    np.testing.assert_allclose(report.pretrained_cosines.numpy(), expected_pretrained, atol=1e-10)
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    expected_members = np.mean([_abs_cos(us[i][:, :16], us[j][:, :16]) for i, j in pairs], axis=0)
    np.testing.assert_allclose(report.member_cosines.numpy(), expected_members, atol=1e-10)
    deltas = [np.linalg.svd((m - reference).numpy())[0][:, :16] for m in members]
    expected_delta = np.mean([_abs_cos(deltas[i], deltas[j]) for i, j in pairs], axis=0)
    np.testing.assert_allclose(report.delta_member_cosines.numpy(), expected_delta, atol=1e-10)
    assert report.member_cosines.shape == (16, 16)
    np.testing.assert_allclose(report.pretrained_singular_values.numpy(), s0)


def test_identical_members_have_a_unit_diagonal_member_heatmap() -> None:
    reference, members = _weights()
    same = members[:1].repeat(3, 1, 1)
    report = analyse_projection(reference, same, k=4)
    np.testing.assert_allclose(np.diag(report.member_cosines.numpy()), np.ones(4), atol=1e-10)


def test_member_updates_flatten_one_projection_kind_and_subsample() -> None:
    reference, members = _weights()
    weights = {
        "0.v": (reference, members),
        "0.q": (reference, members),
        "1.v": (reference, members),
    }
    updates = member_updates(weights, "v")
    assert sorted(updates) == ["0.v", "1.v"]
    torch.testing.assert_close(updates["0.v"], (members - reference).flatten(1).float())
    keep = feature_indices(20 * 18, 50)
    assert keep is not None and keep.shape == (50,) and bool((keep.diff() > 0).all())
    assert feature_indices(20 * 18, 1000) is None
    sub = member_updates(weights, "v", {"0.v": keep, "1.v": None})
    torch.testing.assert_close(sub["0.v"], updates["0.v"][:, keep])
    assert sub["1.v"].shape == (3, 360)
    with pytest.raises(ValueError, match="'o'"):
        member_updates(weights, "o")


def test_trajectory_embedding_puts_the_pretrained_weights_first(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    # 3 snapshots x 4 members drifting away from the origin (the pretrained weights)
    direction = torch.randn(4, 30, generator=generator)
    snapshots = torch.stack([s * direction for s in (0.5, 1.0, 1.5)])
    embedding = trajectory_embedding(snapshots, seed=0)
    assert embedding.shape == (1 + 3 * 4, 2) and np.isfinite(embedding).all()
    with pytest.raises(ValueError, match="3 points"):
        trajectory_embedding(torch.zeros(1, 1, 5))
