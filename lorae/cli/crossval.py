"""``lorae crossval``: k-fold cross-validation from one command (paper appendix A.2, ESC-50).

For each fold the config is trained with ``data.init_args.test_fold`` set to that fold, and
the model predicts its held-out fold. Which epoch's predictions count (``--checkpoint``):

- ``common`` (default, the paper's protocol): after every training epoch each fold's model
  predicts its held-out fold; "the epoch with the best average accuracy across all five folds
  is chosen", and "the predictions of all five folds at the chosen epoch" are evaluated
  jointly (appendix A.2). One epoch for all folds, not each fold's own best.
- ``last``: the final epoch of every fold.
- ``best``: each fold's best checkpoint of the config's ``ModelCheckpoint`` (needs a monitor).

The member logits of all folds are then evaluated jointly: every clip of the data set is
predicted exactly once, by the model that did not see it, and accuracy, ECE, NLL, Brier and F1
are computed on the pooled predictions. Per-fold metrics are reported as well.

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
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lorae.cli.compose import expand_config_args
from lorae.errors import ConfigError
from lorae.evaluation.collect import collect_member_logits
from lorae.metrics import EnsembleMetrics

__all__ = [
    "HeldOutLogits",
    "common_epoch",
    "cross_validate",
    "ensemble_accuracy",
    "main",
    "pooled_metrics",
]

Selection = Literal["common", "last", "best"]


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
        choices=("common", "last", "best"),
        default="common",
        help="which predictions of the held-out folds count: 'common' (the paper's, appendix "
        "A.2): the one epoch with the best accuracy averaged over the folds; 'last': the "
        "final epoch; 'best': each fold's best checkpoint of the config's ModelCheckpoint",
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


def ensemble_accuracy(logits: Tensor, targets: Tensor) -> float:
    """Accuracy of the ensemble's prediction (the mean of the members' softmaxes).

    Shape:
        - logits: ``(M, B, C)``.
        - targets: ``(B,)``.
    """
    return float((logits.softmax(-1).mean(0).argmax(-1) == targets).float().mean())


def common_epoch(epoch_logits: Sequence[Sequence[Tensor]], targets: Sequence[Tensor]) -> int:
    """The epoch whose held-out accuracy, averaged over the folds, is highest (the first one
    on ties): the paper's choice of "the epoch with the best average accuracy across all five
    folds" (appendix A.2).

    Args:
        epoch_logits: per fold, its held-out member logits after each epoch, each ``(M, B_k, C)``.
        targets: per fold, the held-out targets ``(B_k,)``.

    Raises:
        ConfigError: If the folds did not train the same number of epochs.
    """
    counts = {len(per_epoch) for per_epoch in epoch_logits}
    if len(counts) != 1 or 0 in counts:
        raise ConfigError(
            f"Every fold must record the same, non-zero number of epochs, got {sorted(counts)}."
        )
    mean_acc = mean_accuracies(epoch_logits, targets)
    return max(range(len(mean_acc)), key=lambda epoch: (mean_acc[epoch], -epoch))


def mean_accuracies(
    epoch_logits: Sequence[Sequence[Tensor]], targets: Sequence[Tensor]
) -> list[float]:
    """Per epoch, the held-out accuracy averaged over the folds (see :func:`common_epoch`)."""
    per_fold = [
        [ensemble_accuracy(logits, fold_targets) for logits in per_epoch]
        for per_epoch, fold_targets in zip(epoch_logits, targets, strict=True)
    ]
    return [sum(accs) / len(accs) for accs in zip(*per_fold, strict=True)]


class HeldOutLogits(Callback):
    """After every training epoch, the model's member logits on the held-out fold (the data
    module's predict split), kept on the CPU for :func:`common_epoch`."""

    def __init__(self) -> None:
        self.logits: list[Tensor] = []
        self.targets: Tensor | None = None

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set at runtime
        logits, targets = collect_member_logits(
            pl_module,
            datamodule.predict_dataloader(),
            trainer.strategy.batch_to_device,
            forward_context=trainer.precision_plugin.forward_context,
        )
        self.logits.append(logits)
        self.targets = targets


def _fit_fold(
    configs: list[str], fold: int, root: Path, extra: list[str], checkpoint: Selection
) -> tuple[list[Tensor], Tensor, int, int]:
    """Train one fold. Returns its held-out member logits (one per epoch for ``common``, else
    one), the held-out targets, the number of classes and the ECE bins."""
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
    recorder = HeldOutLogits()
    if checkpoint == "common":
        cli.trainer.callbacks.append(recorder)  # type: ignore[attr-defined]  # set at runtime
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if checkpoint == "common" and recorder.logits and recorder.targets is not None:
        return recorder.logits, recorder.targets, cli.model.num_classes, cli.model.ece_bins
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
    return [logits], targets, cli.model.num_classes, cli.model.ece_bins


def cross_validate(
    configs: list[str],
    folds: Sequence[int],
    output: Path,
    extra: list[str],
    checkpoint: Selection = "common",
) -> dict[str, Any]:
    """Run every fold, then write ``output/crossval.json`` (per-fold and pooled metrics) and
    ``output/fold_<k>/test_logits.pt`` (member logits and targets of the held-out fold at the
    selected epoch; with ``common`` also ``epoch_logits``, one entry per epoch).

    Returns:
        The JSON content: ``{"folds": {k: metrics}, "pooled": metrics, "num_samples": N,
        "epoch": e or None, "mean_accuracy_per_epoch": [...] or None, ...}``; ``epoch`` counts
        from 0, like Lightning's.
    """
    if len(set(folds)) != len(folds) or not folds:
        raise ConfigError(f"--folds must list distinct folds, got {list(folds)}.")
    epoch_logits: list[list[Tensor]] = []
    targets: list[Tensor] = []
    num_classes, ece_bins = 0, 10
    for fold in folds:
        fold_logits, fold_targets, num_classes, ece_bins = _fit_fold(
            configs, fold, output / f"fold_{fold}", extra, checkpoint
        )
        epoch_logits.append(fold_logits)
        targets.append(fold_targets)
    epoch = common_epoch(epoch_logits, targets) if checkpoint == "common" else None
    per_fold: dict[str, dict[str, float]] = {}
    logits = []
    for fold, per_epoch, fold_targets in zip(folds, epoch_logits, targets, strict=True):
        chosen = per_epoch[-1] if epoch is None else per_epoch[epoch]
        root = output / f"fold_{fold}"
        root.mkdir(parents=True, exist_ok=True)
        saved: dict[str, Any] = {"logits": chosen, "target": fold_targets}
        if checkpoint == "common":
            saved["epoch_logits"] = torch.stack(per_epoch)
        torch.save(saved, root / "test_logits.pt")
        per_fold[str(fold)] = pooled_metrics([chosen], [fold_targets], num_classes, ece_bins)
        logits.append(chosen)
    result = {
        "folds": per_fold,
        "pooled": pooled_metrics(logits, targets, num_classes, ece_bins),
        "num_samples": int(sum(t.numel() for t in targets)),
        "checkpoint": checkpoint,
        "epoch": epoch,
        "mean_accuracy_per_epoch": (
            mean_accuracies(epoch_logits, targets) if checkpoint == "common" else None
        ),
        "configs": configs,
        "extra_args": extra,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "crossval.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def main(argv: list[str]) -> int:
    """Entry point of ``lorae crossval``."""
    args, extra = _parser().parse_known_args(argv)
    # Bad input is an error before anything is made: a missing or unreadable config, then a
    # folder that cannot be created (not after the first fold's training).
    expand_config_args([a for config in args.config for a in ("--config", config)])
    Path(args.output).mkdir(parents=True, exist_ok=True)
    result = cross_validate(args.config, args.folds, Path(args.output), extra, args.checkpoint)
    pooled = result["pooled"]
    if result["epoch"] is not None:
        print(f"Epoch with the best accuracy averaged over the folds: {result['epoch']}")
    print(
        f"Pooled over folds {args.folds} ({result['num_samples']} samples): "
        + ", ".join(f"{k}={pooled[k]:.4f}" for k in ("acc", "ece", "nll", "brier") if k in pooled)
    )
    print(f"Cross-validation metrics written to {Path(args.output) / 'crossval.json'}")
    return 0
