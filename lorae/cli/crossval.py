"""``lorae crossval``: k-fold cross-validation from one command (paper appendix A.2, ESC-50).

For each fold the config is trained with ``data.init_args.test_fold`` set to that fold; the
trained model (the final epoch, or the best validation checkpoint) predicts its held-out fold.
The member logits of all folds are then evaluated jointly, as the paper does: every clip of the
data set is predicted exactly once, by the model that did not see it, and accuracy, ECE, NLL,
Brier and F1 are computed on the pooled predictions. Per-fold metrics are reported as well.

    lorae crossval --config configs/esc50/lora_ensemble.yaml --output runs/esc50_cv \\
        --trainer.max_epochs=25

Arguments other than the tool's own are passed to every fold's ``lorae fit``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lorae.errors import ConfigError
from lorae.evaluation.collect import collect_member_logits
from lorae.metrics import EnsembleMetrics

__all__ = ["cross_validate", "main", "pooled_metrics"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorae crossval",
        description="Train one model per fold (data.init_args.test_fold) and evaluate the "
        "held-out predictions of all folds jointly (paper appendix A.2). Unknown arguments "
        "(e.g. --trainer.max_epochs=25) go to every fold's fit.",
    )
    parser.add_argument("--config", required=True, action="append", help="lorae config file")
    parser.add_argument("--folds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--output", default="runs/crossval", help="folder for folds + JSON")
    parser.add_argument(
        "--checkpoint",
        choices=("last", "best"),
        default="last",
        help="weights that predict the held-out fold: the final epoch (the paper's fixed "
        "epoch) or the best checkpoint of the config's ModelCheckpoint",
    )
    return parser


def pooled_metrics(
    logits: Sequence[Tensor], targets: Sequence[Tensor], num_classes: int, ece_bins: int = 10
) -> dict[str, float]:
    """Ensemble metrics of the concatenated predictions of several folds.

    Shape:
        - logits: each ``(M, B_k, C)``.
        - targets: each ``(B_k,)``.
    """
    all_logits = torch.cat(list(logits), dim=1)
    metrics = EnsembleMetrics(num_classes, all_logits.shape[0], ece_bins)
    metrics.update(all_logits, torch.cat(list(targets)))
    return {key: float(value) for key, value in metrics.compute().items()}


def _fit_fold(
    configs: list[str], fold: int, root: Path, extra: list[str], checkpoint: Literal["last", "best"]
) -> tuple[Tensor, Tensor, int, int]:
    from lorae.checkpoints.safe import load_checkpoint_safely
    from lorae.cli.main import build_cli

    args = [a for config in configs for a in ("--config", config)]
    args += [
        *extra,
        f"--data.init_args.test_fold={fold}",
        f"--trainer.default_root_dir={root}",
    ]
    cli = build_cli(args, run=False)
    if not hasattr(cli.datamodule, "test_fold"):
        raise ConfigError(
            f"lorae crossval needs a data module with folds (test_fold), e.g. ESC50DataModule; "
            f"got {type(cli.datamodule).__name__}."
        )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if checkpoint == "best":
        callback = cli.trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        if not best:
            raise ConfigError(
                "--checkpoint best needs a ModelCheckpoint with a monitor in the config."
            )
        best_checkpoint = load_checkpoint_safely(best)
        cli.model.on_load_checkpoint(best_checkpoint)  # fills an adapter-only checkpoint
        cli.model.load_state_dict(best_checkpoint["state_dict"])
    logits, targets = collect_member_logits(
        cli.model,
        cli.datamodule.predict_dataloader(),
        cli.trainer.strategy.batch_to_device,
        forward_context=cli.trainer.precision_plugin.forward_context,
    )
    return logits, targets, cli.model.num_classes, cli.model.ece_bins


def cross_validate(
    configs: list[str],
    folds: Sequence[int],
    output: Path,
    extra: list[str],
    checkpoint: Literal["last", "best"] = "last",
) -> dict[str, Any]:
    """Run every fold, then write ``output/crossval.json`` (per-fold and pooled metrics) and
    ``output/fold_<k>/test_logits.pt`` (member logits and targets of the held-out fold).

    Returns:
        The JSON content: ``{"folds": {k: metrics}, "pooled": metrics, "num_samples": N, ...}``.
    """
    if len(set(folds)) != len(folds) or not folds:
        raise ConfigError(f"--folds must list distinct folds, got {list(folds)}.")
    per_fold: dict[str, dict[str, float]] = {}
    logits, targets = [], []
    num_classes, ece_bins = 0, 10
    for fold in folds:
        root = output / f"fold_{fold}"
        fold_logits, fold_targets, num_classes, ece_bins = _fit_fold(
            configs, fold, root, extra, checkpoint
        )
        root.mkdir(parents=True, exist_ok=True)
        torch.save({"logits": fold_logits, "target": fold_targets}, root / "test_logits.pt")
        per_fold[str(fold)] = pooled_metrics([fold_logits], [fold_targets], num_classes, ece_bins)
        logits.append(fold_logits)
        targets.append(fold_targets)
    result = {
        "folds": per_fold,
        "pooled": pooled_metrics(logits, targets, num_classes, ece_bins),
        "num_samples": int(sum(t.numel() for t in targets)),
        "checkpoint": checkpoint,
        "configs": configs,
        "extra_args": extra,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "crossval.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def main(argv: list[str]) -> int:
    """Entry point of ``lorae crossval``."""
    args, extra = _parser().parse_known_args(argv)
    result = cross_validate(args.config, args.folds, Path(args.output), extra, args.checkpoint)
    pooled = result["pooled"]
    print(
        f"Pooled over folds {args.folds} ({result['num_samples']} samples): "
        + ", ".join(f"{k}={pooled[k]:.4f}" for k in ("acc", "ece", "nll", "brier") if k in pooled)
    )
    print(f"Cross-validation metrics written to {Path(args.output) / 'crossval.json'}")
    return 0
