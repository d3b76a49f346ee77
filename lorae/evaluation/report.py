"""Files ``lorae test`` writes next to ``metrics.json``: tables and figures of the evaluation.

- ``ensemble_size.csv``: accuracy, ECE and NLL of the first ``k`` members, ``k = 1..M``;
- ``diversity.json``: the pairwise disagreement and Jensen-Shannon matrices (the paper's
  aggregated one and the per-sample one, ``T = 1``);
- ``temperature_sweep.csv`` / ``.md``: the test metrics at every swept temperature (paper
  Tab. 17), when ``--temperature_sweep`` is given;
- ``risk_coverage.csv``: the risk-coverage curve of the test split (:func:`risk_coverage_rows`);
- with plots: ``reliability.png`` (and ``reliability_calibrated.png`` after temperature
  scaling), ``ensemble_size.png``, ``risk_coverage.png``, ``disagreement.png``, ``jsd.png``,
  each also logged to TensorBoard (``test/<name>``) when the run logs there.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from lorae.evaluation import figures
from lorae.evaluation.result import RiskCoverage, SizeCurve, TestResult, VariantResult

#: ``diversity.json`` is indented up to this many members and written compact beyond.
DIVERSITY_INDENTED_MAX = 32

__all__ = [
    "risk_coverage_rows",
    "size_curve_rows",
    "sweep_rows",
    "write_table",
    "write_test_artifacts",
]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_table(path_stem: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Write ``rows`` as ``<stem>.csv`` and a Markdown table ``<stem>.md``."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    csv_path = _write_csv(path_stem.with_suffix(".csv"), rows)
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


def _risk_coverage_series(result: TestResult) -> dict[str, RiskCoverage]:
    """The drawn risk-coverage curves by column suffix: the uncalibrated variant ranked by
    confidence (``""``) and by mutual information (``"_by_mi"``), and the same after
    temperature scaling (``"_calibrated"``, ``"_calibrated_by_mi"``)."""
    series: dict[str, RiskCoverage] = {}
    found: list[tuple[VariantResult | None, str]] = [
        (result.variant("uncalibrated"), ""),
        (result.variant("calibrated"), "_calibrated"),
    ]
    for variant, suffix in found:
        if variant is None:
            continue
        if "msp" in variant.selective:
            series[suffix] = variant.selective["msp"]
        if "mi" in variant.selective:
            series[f"{suffix}_by_mi"] = variant.selective["mi"]
    return series


def risk_coverage_rows(result: TestResult) -> list[dict[str, float]]:
    """One row per coverage ``k / N``: ``coverage``, ``risk`` (ranked by confidence),
    ``risk_by_mi`` (by mutual information), ``risk_oracle`` (a perfect ranking of the same
    predictions), and after temperature scaling ``risk_calibrated`` and
    ``risk_calibrated_by_mi``. Empty when the test split is."""
    series = _risk_coverage_series(result)
    if not series:
        return []
    first = next(iter(series.values()))
    columns: dict[str, Any] = {"coverage": first.coverage}
    columns.update({f"risk{suffix}": curve.risk for suffix, curve in series.items()})
    columns["risk_oracle"] = figures.oracle_risk(first.risk).tolist()
    names = list(columns)
    return [dict(zip(names, row, strict=True)) for row in zip(*columns.values(), strict=True)]


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
    calibrated = result.variant("calibrated")
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
        # one number per line is readable for an 8-member ensemble; for a posterior of hundreds
        # of samples (Bayes-LoRA's 512: 3 x 262,144 entries) it is 21 MB, compact 17 MB
        indent = 2 if len(diversity.disagreement_matrix) <= DIVERSITY_INDENTED_MAX else None
        path.write_text(json.dumps(matrices, indent=indent) + "\n")
        written.append(path)
    sweep = sweep_rows(result)
    if sweep:
        written += write_table(out_dir / "temperature_sweep", sweep)
    risk_rows = risk_coverage_rows(result)
    if risk_rows:  # one row per test sample: a CSV only, no Markdown table
        out_dir.mkdir(parents=True, exist_ok=True)
        written.append(_write_csv(out_dir / "risk_coverage.csv", risk_rows))
    if not plots:
        return written

    drawn = {}
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
    labels = {"": "confidence", "_by_mi": "mutual information"}
    if calibrated is not None:
        fitted = f"T = {calibrated.variant.temperature:.3f}"
        labels["_calibrated"] = f"confidence, {fitted}"
        labels["_calibrated_by_mi"] = f"mutual information, {fitted}"
    curves = {labels[k]: c for k, c in _risk_coverage_series(result).items() if c.risk}
    if curves:
        drawn["risk_coverage"] = figures.risk_coverage_figure(curves)
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
