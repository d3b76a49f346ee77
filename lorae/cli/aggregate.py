"""``lorae aggregate``: the paper's results table from several runs' ``metrics.json``.

    lorae aggregate runs/ --metrics acc ece nll brier --output results

Every ``metrics.json`` found (files given, or searched recursively under folders given) is one
run. Runs are grouped by fields of their ``method`` record (default: method name and
``num_members``, so the seeds of one configuration form one group); each metric is reported as
``mean ± std`` over the group (sample standard deviation, ``n - 1``; blank with one run) in a
Markdown table (printed, and written as ``<output>.md``) and a CSV with separate mean/std
columns (``<output>.csv``). A metric name without ``/`` means ``test/<name>``; a name starting
with ``compute.`` reads the compute-cost report (e.g. ``compute.parameters.trainable``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorae.errors import ConfigError, DataNotFoundError

__all__ = ["aggregate", "find_reports", "main", "metric_value"]


def find_reports(paths: Sequence[Path]) -> list[Path]:
    """``metrics.json`` files: the given files and every one found under the given folders.

    Raises:
        DataNotFoundError: a path does not exist, or nothing was found.
    """
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(path.rglob("metrics.json"))
        elif path.is_file():
            found.append(path)
        else:
            raise DataNotFoundError(
                f"'{path}' does not exist (give metrics.json files or folders)."
            )
    if not found:
        raise DataNotFoundError(f"No metrics.json under {[str(p) for p in paths]}.")
    return found


def metric_value(report: dict[str, Any], name: str) -> float | None:
    """The value of ``name`` in one ``metrics.json`` (``None`` when absent or null)."""
    if name.startswith("compute."):
        value: Any = report.get("compute", {})
        for part in name.split(".")[1:]:
            value = value.get(part) if isinstance(value, dict) else None
        return None if value is None else float(value)
    key = name if "/" in name else f"test/{name}"
    value = report.get("metrics", {}).get(key)
    return None if value is None else float(value)


def aggregate(
    reports: Sequence[dict[str, Any]], metrics: Sequence[str], group_by: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per group: ``{"group", "n", "<metric>/mean", "<metric>/std"}``, in first-seen
    order. ``std`` is the sample standard deviation (``nan`` for a single run)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for report in reports:
        method = report.get("method", {})
        label = ", ".join(
            f"{method.get(k)}" if k == "method" else f"{k}={method.get(k)}" for k in group_by
        )
        groups.setdefault(label, []).append(report)
    rows = []
    for label, members in groups.items():
        row: dict[str, Any] = {"group": label, "n": len(members)}
        for name in metrics:
            values = [v for r in members if (v := metric_value(r, name)) is not None]
            row[f"{name}/mean"] = statistics.fmean(values) if values else math.nan
            row[f"{name}/std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        rows.append(row)
    return rows


def _markdown(rows: list[dict[str, Any]], metrics: Sequence[str], digits: int) -> str:
    def cell(row: dict[str, Any], name: str) -> str:
        mean, std = row[f"{name}/mean"], row[f"{name}/std"]
        if math.isnan(mean):
            return "n/a"
        return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"

    lines = [
        "| method | n | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
        *(
            f"| {r['group']} | {r['n']} | " + " | ".join(cell(r, m) for m in metrics) + " |"
            for r in rows
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """Entry point of ``lorae aggregate``."""
    parser = argparse.ArgumentParser(
        prog="lorae aggregate",
        description="Collect metrics.json of several runs into a mean ± std table "
        "(Markdown and CSV).",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="metrics.json files or folders")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=["acc", "f1", "ece", "nll", "brier"],
        help="metric names (default: acc f1 ece nll brier)",
    )
    parser.add_argument(
        "--group_by",
        nargs="+",
        default=["method", "num_members"],
        help="fields of the method record that define a group (default: method num_members)",
    )
    parser.add_argument("--digits", type=int, default=4, help="decimals in the Markdown table")
    parser.add_argument(
        "--output", type=Path, default=None, help="write <output>.md and <output>.csv"
    )
    args = parser.parse_args(argv)
    if args.digits < 0:
        raise ConfigError(f"--digits must be >= 0, got {args.digits}.")
    paths = find_reports(args.paths)
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(
                f"'{path}' is not a metrics.json file written by `lorae test` (not valid UTF-8 "
                f"JSON: {error}); remove it from the paths or regenerate it."
            ) from error
    rows = aggregate(reports, args.metrics, args.group_by)
    table = _markdown(rows, args.metrics, args.digits)
    print(f"{len(paths)} runs\n\n{table}", end="")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".md").write_text(table)
        with args.output.with_suffix(".csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"Written: {args.output.with_suffix('.md')}, {args.output.with_suffix('.csv')}")
    return 0
