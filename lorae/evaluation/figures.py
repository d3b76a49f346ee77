"""Figures of the evaluation (paper Fig. 2-8, 12-14), drawn with matplotlib.

matplotlib is an optional extra (``pip install 'lorae[plots]'``); :func:`require_pyplot` imports
it on first use with the non-interactive ``Agg`` backend and raises a clear error without it.
Every function returns a :class:`matplotlib.figure.Figure`; :func:`save_figure` writes PNGs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lorae.errors import ConfigError
from lorae.evaluation.result import ReliabilityCurve, RiskCoverage

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "ensemble_size_figure",
    "heatmap_figure",
    "heatmap_ticks",
    "matplotlib_available",
    "reliability_figure",
    "require_pyplot",
    "risk_coverage_figure",
    "save_figure",
    "scatter_figure",
    "singular_values_figure",
]


def matplotlib_available() -> bool:
    """Whether the ``plots`` extra (matplotlib) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def require_pyplot() -> Any:
    """``matplotlib.pyplot`` with the file-only ``Agg`` backend.

    Raises:
        ConfigError: matplotlib is not installed.
    """
    if not matplotlib_available():
        raise ConfigError(
            "Plots need matplotlib, which is not installed. Install the plots extra "
            "(pip install 'lorae[plots]') or turn plots off (--plots=false)."
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Figure, path: Path) -> Path:
    """Save ``figure`` as a PNG (parents created), close it and return ``path``."""
    plt = require_pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


#: Side of the drawn matrix in inches is at most this (a 512-sample Bayes-LoRA posterior would
#: otherwise ask for a 233-inch, 20-GB canvas).
HEATMAP_MAX_INCHES = 9.0
#: Matrices larger than this get about this many evenly spaced tick labels instead of one each.
HEATMAP_MAX_TICKS = 16
#: Matrices up to this size get every cell's value written into it.
HEATMAP_MAX_ANNOTATED = 12


def heatmap_ticks(size: int) -> list[int]:
    """The row (and column) indices that get a tick label: all of them up to
    ``HEATMAP_MAX_TICKS``, else about that many, evenly spaced, first and last included."""
    if size <= HEATMAP_MAX_TICKS:
        return list(range(size))
    spaced = np.linspace(0, size - 1, HEATMAP_MAX_TICKS).round().astype(int)
    return sorted(set(spaced.tolist()))


def heatmap_figure(
    matrix: np.ndarray,
    title: str,
    labels: Sequence[str] | None = None,
    colorbar_label: str = "",
    axis_labels: tuple[str, str] = ("member", "member"),
) -> Figure:
    """A square matrix (e.g. pairwise disagreement between members) as a heat map.

    Cells carry their values up to ``HEATMAP_MAX_ANNOTATED`` members; the canvas grows with the
    size up to ``HEATMAP_MAX_INCHES`` and the tick labels are thinned beyond
    ``HEATMAP_MAX_TICKS``, so a posterior of hundreds of samples (Bayes-LoRA's 512, appendix W)
    draws in bounded memory.

    Shape:
        matrix: ``(M, M)``
    """
    plt = require_pyplot()
    size = matrix.shape[0]
    names = list(labels) if labels is not None else [str(i) for i in range(size)]
    side = min(0.45 * size, HEATMAP_MAX_INCHES)
    figure, axes = plt.subplots(figsize=(1.0 + side + 1.5, 1.0 + side))
    image = axes.imshow(matrix, cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axes, label=colorbar_label)
    ticks = heatmap_ticks(size)
    axes.set_xticks(ticks, [names[i] for i in ticks])
    axes.set_yticks(ticks, [names[i] for i in ticks])
    axes.set_xlabel(axis_labels[0])
    axes.set_ylabel(axis_labels[1])
    axes.set_title(title)
    if size <= HEATMAP_MAX_ANNOTATED:
        for i in range(size):
            for j in range(size):
                axes.text(
                    j,
                    i,
                    f"{matrix[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if matrix[i, j] < matrix.max() / 2 else "black",
                )
    return figure


def ensemble_size_figure(sizes: Sequence[int], series: Mapping[str, Sequence[float]]) -> Figure:
    """Metrics of the first ``k`` members against ``k`` (paper Fig. 4 and 6), one panel each."""
    plt = require_pyplot()
    figure, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series), 3.0), squeeze=False)
    for ax, (name, values) in zip(axes[0], series.items(), strict=True):
        ax.plot(list(sizes), list(values), marker="o")
        ax.set_xlabel("ensemble size k (first k members)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def singular_values_figure(values: dict[str, np.ndarray], title: str) -> Figure:
    """Singular values per member (one line each), e.g. of ``B_i A_i`` for one projection.

    Shape:
        each value: ``(M, K)``
    """
    plt = require_pyplot()
    figure, axes = plt.subplots(1, len(values), figsize=(3.6 * len(values), 3.0), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], values.items(), strict=True):
        for m, row in enumerate(matrix):
            ax.semilogy(np.arange(1, row.shape[0] + 1), row, marker=".", label=f"member {m}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("index")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("singular value")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def scatter_figure(points: np.ndarray, labels: Sequence[str], title: str) -> Figure:
    """A labelled 2-D scatter plot (the t-SNE of the members' predictions, paper Fig. 2).

    Shape:
        points: ``(M, 2)``
    """
    plt = require_pyplot()
    figure, axes = plt.subplots(figsize=(4.0, 3.6))
    axes.scatter(points[:, 0], points[:, 1], c=np.arange(points.shape[0]), cmap="tab20")
    for (x, y), label in zip(points, labels, strict=True):
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=8)
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])
    return figure


def reliability_figure(bins: ReliabilityCurve, title: str = "Reliability diagram") -> Figure:
    """Accuracy per confidence bin with the gap to the diagonal shaded, above a histogram of
    the share of samples per bin (the layout of the paper's Fig. 5).

    The extra bin of confidence exactly 1 is drawn together with the last bin.

    Args:
        bins: the bins of a :class:`~lorae.evaluation.result.VariantResult`.
        title: figure title.
    """
    plt = require_pyplot()
    count = np.asarray(bins.count, dtype=np.float64)
    conf_sum = np.nan_to_num(np.asarray(bins.confidence, dtype=np.float64)) * count
    correct = np.nan_to_num(np.asarray(bins.accuracy, dtype=np.float64)) * count
    # Merge the "confidence == 1" bin into the last bin for display.
    for array in (count, conf_sum, correct):
        array[-2] += array[-1]
    count, conf_sum, correct = count[:-1], conf_sum[:-1], correct[:-1]
    n_bins = count.shape[0]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    width = 1.0 / n_bins
    filled = count > 0
    accuracy = np.divide(correct, count, out=np.zeros_like(count), where=filled)
    confidence = np.divide(conf_sum, count, out=centers.copy(), where=filled)

    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.2, 5.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.bar(centers, accuracy, width=width, edgecolor="black", color="tab:blue", label="accuracy")
    gap_low = np.minimum(accuracy, confidence)
    gap_high = np.maximum(accuracy, confidence)
    top.bar(
        centers[filled],
        (gap_high - gap_low)[filled],
        bottom=gap_low[filled],
        width=width,
        color="tab:red",
        alpha=0.35,
        edgecolor="tab:red",
        hatch="//",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ece = bins.ece
    top.set_title(f"{title}\nECE = {ece:.4f}")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    share = count / max(count.sum(), 1.0)
    bottom.bar(centers, share, width=width, edgecolor="black", color="tab:gray")
    bottom.set_xlabel("confidence (top-1 predictive probability)")
    bottom.set_ylabel("share")
    bottom.set_xlim(0, 1)
    figure.tight_layout()
    return figure


def oracle_risk(risk: Sequence[float]) -> np.ndarray:
    """The risk-coverage curve of a perfect ranking (every error after every correct sample)
    with the same errors: ``r*_k = max(0, k - (N - E)) / k``, ``E = N * r_N`` errors.

    Shape:
        risk: ``(N,)``; output: ``(N,)``
    """
    n = len(risk)
    k = np.arange(1, n + 1, dtype=np.float64)
    errors = round(float(risk[-1]) * n) if n else 0
    return np.maximum(0.0, k - (n - errors)) / k


def risk_coverage_figure(
    curves: Mapping[str, RiskCoverage], title: str = "Risk-coverage curve"
) -> Figure:
    """Selective risk (error rate of the answered samples) against coverage (Geifman &
    El-Yaniv 2017), one line per curve, with the perfect ranking (oracle) of the first curve
    and the error rate of a random ranking as references; the legend gives each AURC.

    Args:
        curves: ``{label: curve}``, e.g. the ranking by confidence and by mutual information.
        title: figure title.
    """
    plt = require_pyplot()
    figure, axes = plt.subplots(figsize=(5.2, 4.0))
    first: RiskCoverage | None = None
    for label, curve in curves.items():
        if first is None:
            first = curve
        axes.plot(curve.coverage, curve.risk, label=f"{label} (AURC {curve.aurc:.4f})")
    if first is not None and first.risk:
        oracle = oracle_risk(first.risk)
        axes.plot(first.coverage, oracle, "k:", linewidth=1, label="oracle (perfect ranking)")
        axes.axhline(first.risk[-1], color="gray", linestyle="--", linewidth=1, label="random")
    axes.set_xlabel("coverage (share of samples answered)")
    axes.set_ylabel("risk (error rate of the answered)")
    axes.set_xlim(0, 1)
    axes.set_ylim(bottom=0)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    # below the axes: the curves fill the whole plot area
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    figure.tight_layout()
    return figure
