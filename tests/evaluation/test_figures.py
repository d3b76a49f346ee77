"""Heat maps stay bounded for posteriors with hundreds of samples.

A 512-sample Bayes-LoRA test (appendix W) was killed for memory while drawing its 512 x 512
disagreement matrix: the canvas grew 0.45 inch per member (233 inches a side, ~20 GB)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lorae.evaluation import figures

pytest.importorskip("matplotlib")


def test_small_matrices_keep_every_tick_and_their_cell_values() -> None:
    matrix = np.arange(16, dtype=float).reshape(4, 4) / 16
    figure = figures.heatmap_figure(matrix, "small")
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["0", "1", "2", "3"]
    assert len(axes.texts) == 16
    assert figure.get_size_inches()[1] == pytest.approx(1.0 + 0.45 * 4)


def test_a_512_sample_matrix_draws_on_a_bounded_canvas(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    matrix = rng.random((512, 512))
    figure = figures.heatmap_figure(matrix, "posterior samples")
    width, height = figure.get_size_inches()
    assert width <= figures.HEATMAP_MAX_INCHES + 2.5
    assert height <= figures.HEATMAP_MAX_INCHES + 1.0
    axes = figure.axes[0]
    labels = [t.get_text() for t in axes.get_xticklabels()]
    assert len(labels) <= figures.HEATMAP_MAX_TICKS
    assert labels[0] == "0" and labels[-1] == "511"
    assert not axes.texts  # no per-cell values at this size
    path = figures.save_figure(figure, tmp_path / "big.png")
    assert path.stat().st_size < 5_000_000


@pytest.mark.parametrize("size", [1, 16, 17, 100, 512])
def test_ticks_are_sorted_unique_and_span_the_matrix(size: int) -> None:
    ticks = figures.heatmap_ticks(size)
    assert ticks == sorted(set(ticks))
    assert ticks[0] == 0 and ticks[-1] == size - 1
    assert len(ticks) == min(size, figures.HEATMAP_MAX_TICKS)
