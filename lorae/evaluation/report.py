"""Files ``lorae test`` writes next to ``metrics.json``: tables and figures of the evaluation.

- ``ensemble_size.csv``: accuracy, ECE and NLL of the first ``k`` members, ``k = 1..M``;
- ``diversity.json``: the pairwise disagreement and Jensen-Shannon matrices (the paper's
  aggregated one and the per-sample one, ``T = 1``);
- ``temperature_sweep.csv`` / ``.md``: the test metrics at every swept temperature (paper
  Tab. 17), when ``--temperature_sweep`` is given;
- with plots: ``reliability.png`` (and ``reliability_calibrated.png`` after temperature
  scaling), ``ensemble_size.png``, ``disagreement.png``, ``jsd.png``, each also logged to
  TensorBoard when the run logs there.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from lorae.evaluation import figures
from lorae.evaluation.result import SizeCurve, TestResult

__all__ = ["size_curve_rows", "sweep_rows", "write_table", "write_test_artifacts"]


def write_table(path_stem: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Write ``rows`` as ``<stem>.csv`` and a Markdown table ``<stem>.md``."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    csv_path = path_stem.with_suffix(".csv")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    md_path = path_stem.with_suffix(".md")

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows),
    ]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def size_curve_rows(curve: SizeCurve) -> list[dict[str, float]]:
    """One row per ensemble size: ``{"k": k, "acc": ..., "ece": ..., "nll": ...}``."""
    return curve.rows()


def sweep_rows(result: TestResult) -> list[dict[str, float]]:
    """One row per swept temperature (paper Tab. 17): the temperature and the test metrics."""
    return [
        {"temperature": v.variant.temperature, **dict(v.scores.items(members=False))}
        for v in result.sweep
    ]


def write_test_artifacts(
    out_dir: Path,
    result: TestResult,
    plots: bool,
    tensorboard: Any | None = None,
    step: int = 0,
) -> list[Path]:
    """Write the evaluation's tables (and figures when ``plots``) into ``out_dir``.

    Args:
        out_dir: the run's log directory.
        result: what the test computed.
        plots: draw the figures (needs matplotlib).
        tensorboard: a ``SummaryWriter`` to log the figures to, or ``None``.
        step: global step the figures are logged at.

    Returns:
        The written files.
    """
    plain = result.variant("uncalibrated")
    written: list[Path] = []
    if plain is not None:
        written += write_table(out_dir / "ensemble_size", size_curve_rows(plain.size_curve))
    diversity = plain.diversity if plain is not None else None
    if diversity is not None:
        matrices = {
            "disagreement_matrix": [list(row) for row in diversity.disagreement_matrix],
            "jsd_matrix": [list(row) for row in diversity.jsd_matrix],
            "jsd_per_sample_matrix": [list(row) for row in diversity.jsd_per_sample_matrix],
        }
        path = out_dir / "diversity.json"
        path.write_text(json.dumps(matrices, indent=2) + "\n")
        written.append(path)
    sweep = sweep_rows(result)
    if sweep:
        written += write_table(out_dir / "temperature_sweep", sweep)
    if not plots:
        return written

    drawn = {}
    calibrated = result.variant("calibrated")
    for variant, name in ((plain, "reliability"), (calibrated, "reliability_calibrated")):
        if variant is not None:
            t = variant.variant.temperature
            label = f"T = {t:.3f}" if variant.variant.kind == "calibrated" else "uncalibrated"
            title = f"Reliability diagram ({label})"
            drawn[name] = figures.reliability_figure(variant.reliability, title)
    if plain is not None:
        curve = plain.size_curve
        series = {"acc": curve.acc, "ece": curve.ece, "nll": curve.nll}
        drawn["ensemble_size"] = figures.ensemble_size_figure(range(1, len(curve.acc) + 1), series)
    if diversity is not None:
        drawn["disagreement"] = figures.heatmap_figure(
            np.asarray(diversity.disagreement_matrix), "Pairwise disagreement rate"
        )
        drawn["jsd"] = figures.heatmap_figure(
            np.asarray(diversity.jsd_matrix), "Pairwise JSD of the aggregated softmaxes (bits)"
        )
    for name, figure in drawn.items():
        if tensorboard is not None:
            tensorboard.add_figure(f"test/{name}", figure, global_step=step, close=False)
        written.append(figures.save_figure(figure, out_dir / f"{name}.png"))
    return written
