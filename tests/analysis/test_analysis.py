"""Function-space diversity, ensemble-size curves, weight-space analysis and cost report,
each against an independent numpy / scipy / scikit-learn computation on small tensors."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lorae.analysis import analyse_projection, diversity_score
from lorae.analysis.embedding import tsne_embedding
from lorae.evaluation.cost import ComputeCostMeter, parameter_counts
from lorae.metrics.diversity import (
    DiversityMetrics,
    disagreement_matrix,
    jensen_shannon_matrix,
    per_sample_jensen_shannon_matrix,
)
from lorae.metrics.ensemble_size import EnsembleSizeCurve, first_k_log_probs
from lorae.metrics.functional import (
    expected_calibration_error,
    mutual_information,
    predictive_log_probs,
)


def _logits(m: int, b: int, c: int, seed: int = 0) -> torch.Tensor:
    return 2 * torch.randn(m, b, c, generator=torch.Generator().manual_seed(seed))


def test_disagreement_matches_a_loop() -> None:
    logits = _logits(4, 50, 3)
    pred = logits.argmax(-1).numpy()
    expected = np.array([[np.mean(pred[i] != pred[j]) for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(disagreement_matrix(logits).numpy(), expected)
    assert expected[0, 1] > 0  # the check is not vacuous


def test_identical_members_have_zero_diversity() -> None:
    logits = _logits(1, 40, 4).repeat(3, 1, 1)
    assert disagreement_matrix(logits).abs().max() == 0
    assert jensen_shannon_matrix(logits).abs().max() < 1e-12
    metric = DiversityMetrics(3, 4)
    metric.update(logits)
    result = metric.compute()
    assert float(result["disagreement"]) == 0 and float(result["jsd"]) < 1e-12
    assert float(result["mi"]) < 1e-6


def test_diversity_metric_accumulates_like_the_functions() -> None:
    logits = _logits(4, 90, 5, seed=2)
    metric = DiversityMetrics(4, 5)
    for lo in range(0, 90, 32):
        metric.update(logits[:, lo : lo + 32])
    result = metric.compute()
    torch.testing.assert_close(result["disagreement_matrix"], disagreement_matrix(logits).double())
    torch.testing.assert_close(result["jsd_matrix"], jensen_shannon_matrix(logits))
    torch.testing.assert_close(
        result["jsd_per_sample_matrix"], per_sample_jensen_shannon_matrix(logits)
    )
    off_diagonal = ~torch.eye(4, dtype=torch.bool)
    assert float(result["jsd"]) == pytest.approx(
        float(jensen_shannon_matrix(logits)[off_diagonal].mean())
    )
    assert float(result["jsd_per_sample"]) == pytest.approx(
        float(per_sample_jensen_shannon_matrix(logits)[off_diagonal].mean())
    )
    assert float(result["mi"]) == pytest.approx(
        float(mutual_information(logits.double()).mean()), rel=1e-5
    )


def test_first_k_predictive_and_size_curve() -> None:
    logits, target = _logits(4, 70, 3, seed=3), torch.randint(0, 3, (70,))
    curve = EnsembleSizeCurve(4, n_bins=10)
    curve.update(logits[:, :40], target[:40])
    curve.update(logits[:, 40:], target[40:])
    result = curve.compute()
    sizes = first_k_log_probs(logits)
    for k in range(1, 5):
        naive = predictive_log_probs(logits[:k])  # the first k members as their own ensemble
        torch.testing.assert_close(sizes[k - 1], naive, rtol=1e-5, atol=1e-5)
        probs = naive.exp()
        acc = float((probs.argmax(-1) == target).double().mean())
        assert float(result["acc"][k - 1]) == pytest.approx(acc)
        assert float(result["ece"][k - 1]) == pytest.approx(
            float(expected_calibration_error(probs, target)), abs=1e-5
        )
        nll = float(-naive.gather(1, target[:, None]).mean())
        assert float(result["nll"][k - 1]) == pytest.approx(nll, rel=1e-5)


def _numpy_left_vectors(w: np.ndarray, k: int) -> np.ndarray:
    u, _, _ = np.linalg.svd(w, full_matrices=False)
    return u[:, :k]


def test_weight_space_numbers_match_numpy() -> None:
    generator = torch.Generator().manual_seed(4)
    reference = torch.randn(12, 10, generator=generator, dtype=torch.float64)
    a = torch.randn(3, 2, 10, generator=generator, dtype=torch.float64)
    b = torch.randn(3, 12, 2, generator=generator, dtype=torch.float64)
    members = reference + 0.8 * b @ a  # W0 + B_i A_i with rank 2
    k = 4
    report = analyse_projection(reference, members, k=k, intruder_threshold=0.6)
    w0, ws = reference.numpy(), members.numpy()
    u0_all, s0, _ = np.linalg.svd(w0, full_matrices=False)
    u0 = u0_all[:, :k]
    for i in range(3):
        ui = _numpy_left_vectors(ws[i], k)
        expected = np.sum((u0.T @ ui) ** 2) / k
        assert float(report.pretrained_similarity[i]) == pytest.approx(expected)
        cosines = np.abs(u0_all.T @ ui).max(axis=0)
        np.testing.assert_allclose(report.max_cosine_to_pretrained[i].numpy(), cosines)
        assert int(report.intruders[i]) == int((cosines < 0.6).sum())
        delta_sv = np.linalg.svd(ws[i] - w0, compute_uv=False)
        np.testing.assert_allclose(report.delta_singular_values[i].numpy(), delta_sv, atol=1e-10)
        assert np.all(delta_sv[2:] < 1e-10)  # rank-2 update
        for j in range(3):
            uj = _numpy_left_vectors(ws[j], k)
            assert float(report.member_similarity[i, j]) == pytest.approx(
                np.sum((ui.T @ uj) ** 2) / k
            )
    np.testing.assert_allclose(report.pretrained_singular_values.numpy(), s0)


def test_unchanged_members_equal_the_pretrained_weights() -> None:
    reference = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
    report = analyse_projection(reference, reference.expand(2, 8, 6), k=3)
    torch.testing.assert_close(report.pretrained_similarity, torch.ones(2, dtype=torch.float64))
    assert report.intruders.sum() == 0
    assert report.delta_singular_values.abs().max() == 0


def test_diversity_score_is_one_minus_mean_pairwise_correlation() -> None:
    generator = torch.Generator().manual_seed(6)
    weights = {}
    expected = []
    for block in range(2):
        reference = torch.randn(5, 4, generator=generator, dtype=torch.float64)
        members = reference + torch.randn(3, 5, 4, generator=generator, dtype=torch.float64)
        weights[f"{block}.v"] = (reference, members)
        weights[f"{block}.q"] = (reference, reference.expand(3, 5, 4))  # ignored: not v
        deltas = (members - reference).reshape(3, -1).numpy()
        corr = np.corrcoef(deltas)
        expected.append(np.mean([corr[i, j] for i, j in itertools.permutations(range(3), 2)]))
    assert diversity_score(weights) == pytest.approx(1 - np.mean(expected))
    same = {"0.v": (weights["0.v"][0], weights["0.v"][1][:1].expand(3, 5, 4))}
    assert diversity_score(same) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="'o'"):
        diversity_score(weights, "o")
    with pytest.raises(ValueError, match=r"'updates'.*'weights'"):
        diversity_score(weights, of="deltas")  # type: ignore[arg-type]


def test_diversity_score_of_weights_correlates_the_whole_matrices() -> None:
    """``of="weights"`` correlates ``W_i`` itself: the shared ``W0`` pulls it towards 0 while
    the updates are small against it, whereas the updates' own correlation does not depend
    on their size (appendix E's two readings)."""
    generator = torch.Generator().manual_seed(7)
    reference = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    noise = torch.randn(4, 6, 5, generator=generator, dtype=torch.float64)
    scores = {}
    for scale in (1e-2, 1.0, 1e2):
        members = reference + scale * noise
        corr = np.corrcoef(members.reshape(4, -1).numpy())
        expected = 1 - np.mean([corr[i, j] for i, j in itertools.permutations(range(4), 2)])
        weights = {"0.v": (reference, members)}
        scores[scale] = diversity_score(weights, of="weights")
        assert scores[scale] == pytest.approx(expected)
        assert diversity_score(weights) == pytest.approx(
            diversity_score({"0.v": (reference, reference + noise)})
        )
    assert scores[1e-2] < 1e-3 < scores[1.0] < scores[1e2]
    assert scores[1e2] == pytest.approx(
        diversity_score({"0.v": (reference, reference + noise)}), abs=1e-3
    )


def test_tsne_embeds_one_point_per_member() -> None:
    embedding = tsne_embedding(_logits(5, 30, 3, seed=7), seed=0)
    assert embedding.shape == (5, 2) and np.isfinite(embedding).all()
    with pytest.raises(ValueError, match="at least 3"):
        tsne_embedding(_logits(2, 30, 3))


def test_parameter_counts() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    counts = parameter_counts(model, num_members=2)
    assert counts == {"total": 15 + 8, "trainable": 8, "trainable_per_member": 4.0}


def test_cost_report_without_measurements() -> None:
    report = ComputeCostMeter().report(nn.Linear(2, 2), 1, None)
    assert report["train_seconds_per_epoch"] is None
    assert report["inference_seconds_per_sample"] is None
    assert report["checkpoint_bytes"] is None
    assert report["parameters"]["total"] == 6


def test_cost_meter_times_batches_after_the_first(tmp_path: Path) -> None:
    meter = ComputeCostMeter()
    meter.start_epoch()
    meter.end_epoch()
    meter.start_test()
    for samples in (4, 3, 5):  # the first batch is warm-up
        meter.start_batch(torch.device("cpu"))
        meter.end_batch(torch.device("cpu"), samples)
    checkpoint = tmp_path / "c.ckpt"
    checkpoint.write_bytes(b"x" * 10)
    report = meter.report(nn.Linear(2, 2), 2, str(checkpoint))
    assert report["inference_samples_timed"] == 8 and report["train_epochs_timed"] == 1
    assert report["checkpoint_bytes"] == 10
    assert report["parameters"]["trainable_per_member"] == 3.0
    meter.start_test()  # a second test forgets the first one's batches
    assert meter.report(nn.Linear(2, 2), 1, None)["inference_samples_timed"] == 0


@pytest.mark.parametrize("kind", ["lora", "explicit", "batch_ensemble", "batch_ensemble_pp"])
def test_weight_space_analysis_reads_every_method_with_member_weights(kind: str) -> None:
    """`lorae analyze` works on any method's member_weights(), not only LoRA-Ensemble's: every
    block and projection is reported and the update spectra equal numpy's SVD of W_i - W_0."""
    from lorae.cli.analyze import analyze_weights
    from lorae.lora import LoRASpec
    from lorae.methods import BatchEnsemble, ExplicitEnsemble, LoRAEnsemble
    from tests.fixtures.models import TINY_BACKBONES

    name, overrides = TINY_BACKBONES["timm_vit"]
    common: dict[str, object] = {"pretrained": False, "backbone_overrides": overrides}
    torch.manual_seed(0)
    model = {
        "lora": lambda: LoRAEnsemble(4, name, num_members=3, lora=LoRASpec(rank=2), **common),
        "explicit": lambda: ExplicitEnsemble(4, name, num_members=3, noise_alpha=0.1, **common),
        "batch_ensemble": lambda: BatchEnsemble(4, name, num_members=3, **common),
        "batch_ensemble_pp": lambda: BatchEnsemble(
            4, name, num_members=3, variant="additive", **common
        ),
    }[kind]()
    if kind == "lora":  # B = 0 at init: give the members distinct updates first
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad and parameter.dim() >= 3:  # A and B factors
                    parameter.normal_()
    weights = model.member_weights()
    depth = len(model.backbone.model.blocks) if kind != "explicit" else 2
    assert set(weights) == {f"{b}.{p}" for b in range(depth) for p in "qkvo"}
    result = analyze_weights(weights, top_k=2, threshold=0.5)
    assert isinstance(result["diversity_score_v"], float)
    assert isinstance(result["diversity_score_v_weights"], float)
    reference, members = weights["1.v"]
    for i in range(3):
        delta = (members[i] - reference).detach().double().numpy()
        expected = np.linalg.svd(delta, compute_uv=False)[:4]
        got = np.asarray(result["projections"]["1.v"]["delta_singular_values"][i])
        # float32 weights: values below rank R are rounding noise, compared to the top one
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * expected[0])
        assert expected[0] > 0, "members differ from the pretrained weights"
