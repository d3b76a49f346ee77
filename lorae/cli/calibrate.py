"""``lorae calibrate``: a calibrated checkpoint, with a temperature and an abstention threshold.

    lorae calibrate --config run/config.yaml --ckpt_path run/checkpoints/best.ckpt \\
        --target_risk 0.05 --delta 0.1

Builds model and data from the config (as ``lorae test``: through :func:`~lorae.cli.main.
build_cli`), runs the **validation split** once and

1. fits one softmax temperature ``T`` by NLL (:func:`~lorae.evaluation.temperature.
   fit_temperature`, the fit of ``lorae test --calibrate temperature``);
2. with ``--target_risk A``: chooses the least conservative threshold on the score for which
   ``P(selective risk <= A) >= 1 - delta`` over the draw of the validation set (Learn then
   Test, fixed-sequence testing, exact binomial p-values); with ``--target_coverage C``: the
   split-conformal threshold whose expected coverage is ``>= C``
   (:mod:`lorae.evaluation.abstention` has the math and the assumptions);
3. writes a **new** checkpoint, ``<stem>.calibrated.ckpt`` beside the input unless
   ``--output`` says otherwise (atomically; the input is never replaced): the original content
   plus the record :data:`~lorae.checkpoints.calibration.CALIBRATION_KEY`.

``lorae predict --ckpt_path <calibrated>`` and :class:`lorae.Predictor` then add
``calibrated_prob_*`` and ``abstain`` to their outputs. Extra ``--key=value`` options are passed
to the config as in ``lorae test``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, cast

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor

from lorae.checkpoints.atomic import atomic_path
from lorae.checkpoints.calibration import (
    CALIBRATION_KEY,
    SCORES,
    AbstentionScore,
    CalibrationRecord,
)
from lorae.checkpoints.safe import load_checkpoint_safely
from lorae.errors import ConfigError, DataNotFoundError, OutputExistsError
from lorae.evaluation.abstention import (
    CONFORMAL_CITATION,
    LTT_CITATION,
    certainty,
    coverage_threshold,
    risk_controlling_threshold,
    score_values,
)
from lorae.evaluation.collect import collect_member_logits
from lorae.evaluation.temperature import fit_temperature
from lorae.module import prediction_outputs

__all__ = ["calibration_from_logits", "main"]

TEMPERATURE_CITATION = (
    "Guo, Pleiss, Sun, Weinberger (2017). On Calibration of Modern Neural Networks. ICML"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorae calibrate",
        description="Fit a softmax temperature and (optionally) an abstention threshold with a "
        "finite-sample guarantee on the validation split, and write them into a new "
        "checkpoint that `lorae predict` and lorae.Predictor use. Extra --key=value options "
        "are passed to the config like in `lorae test`.",
    )
    parser.add_argument("--config", action="append", required=True, help="config file(s)")
    parser.add_argument("--ckpt_path", required=True, type=Path, help="checkpoint to calibrate")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="the calibrated checkpoint to write (default: <stem>.calibrated.ckpt beside "
        "--ckpt_path)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --output")
    targets = parser.add_argument_group("abstention (give at most one target)")
    targets.add_argument(
        "--target_risk",
        type=float,
        default=None,
        help="A: the error rate among accepted inputs must be <= A, with probability >= "
        "1 - delta over the validation draw (Learn then Test)",
    )
    targets.add_argument(
        "--target_coverage",
        type=float,
        default=None,
        help="C: accept at least a share C of new inputs on average (split conformal)",
    )
    targets.add_argument(
        "--delta",
        type=float,
        default=None,
        help="failure probability of the --target_risk guarantee (default 0.1)",
    )
    targets.add_argument(
        "--score",
        choices=SCORES,
        default=None,
        help="what ranks the inputs, at the fitted temperature (default: confidence, the "
        "maximum predictive probability)",
    )
    parser.add_argument(
        "--temperature_fraction",
        type=float,
        default=0.0,
        help="share of the validation split (drawn with --seed) that fits the temperature, "
        "the rest choosing the threshold; 0 (default): both use the whole split, as `lorae "
        "test --calibrate temperature` (the guarantee then assumes the one fitted scalar "
        "does not matter)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --temperature_fraction")
    return parser


def calibration_from_logits(
    logits: Tensor,
    target: Tensor,
    score: AbstentionScore = "confidence",
    target_risk: float | None = None,
    target_coverage: float | None = None,
    delta: float = 0.1,
    temperature_fraction: float = 0.0,
    seed: int = 0,
) -> CalibrationRecord:
    """Fit the temperature and the threshold on validation member logits.

    Args:
        logits: validation member logits.
        target: validation labels.
        score: the ranking score, computed at the fitted temperature.
        target_risk: target selective risk (Learn then Test); ``None``: no such target.
        target_coverage: target expected coverage (split conformal); ``None``: none.
        delta: failure probability of the ``target_risk`` guarantee.
        temperature_fraction: share of the samples (a seeded random subset) that fits the
            temperature, the others choose the threshold; 0: all samples do both.
        seed: seed of that subset.

    Returns:
        The record ``lorae calibrate`` stores (no threshold when neither target is given).

    Raises:
        ConfigError: both targets, an option out of range, or too few samples.
        RiskNotCertifiableError: no threshold certifies ``target_risk``.

    Shape:
        - logits: ``(M, N, C)``
        - target: ``(N,)``
    """
    if target_risk is not None and target_coverage is not None:
        raise ConfigError(
            "Give either --target_risk or --target_coverage, not both: one threshold meets one "
            "target."
        )
    if not 0.0 <= temperature_fraction < 1.0:
        raise ConfigError(
            f"--temperature_fraction must lie in [0, 1), got {temperature_fraction!r}."
        )
    n = target.shape[0]
    if temperature_fraction > 0:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        cut = math.ceil(temperature_fraction * n)
        fit_part, test_part = order[:cut], order[cut:]
        if cut == 0 or test_part.numel() == 0:
            raise ConfigError(
                f"--temperature_fraction {temperature_fraction} leaves no samples for the "
                f"temperature or for the threshold out of {n}."
            )
    else:
        fit_part = test_part = torch.arange(n)
    fit = fit_temperature(logits[:, fit_part], target[fit_part])
    record = CalibrationRecord(
        temperature=fit.temperature,
        nll_before=fit.nll_before,
        nll_after=fit.nll_after,
        num_temperature=fit.num_samples,
        method="temperature scaling (Guo et al. 2017): one T for every member, NLL on the "
        "validation split",
        citation=TEMPERATURE_CITATION,
    )
    if target_risk is None and target_coverage is None:
        return record
    z = logits[:, test_part].double()
    errors = prediction_outputs(z)["pred"] != target[test_part]
    scores = certainty(score_values(z, fit.temperature, score), score)
    if target_risk is not None:
        chosen = risk_controlling_threshold(scores, errors, target_risk, delta)
        method = (
            "Learn then Test: fixed-sequence testing over thresholds from most to least "
            "conservative, exact binomial p-values P(Bin(n_accepted, alpha) <= errors); "
            "the least conservative rejected threshold"
        )
        guarantee = (
            f"P(error rate of pred among accepted new inputs <= {target_risk:g}) >= "
            f"{1 - delta:g} over the draw of the validation set, for exchangeable "
            "validation and new data"
        )
        citation = LTT_CITATION
    else:
        assert target_coverage is not None
        chosen = coverage_threshold(scores, errors, target_coverage)
        method = "split conformal: the k-th largest validation certainty, k = ceil(C (n + 1))"
        guarantee = (
            f"expected share of accepted new inputs >= {target_coverage:g} (over the "
            "validation draw and the new input), for exchangeable validation and new data"
        )
        citation = CONFORMAL_CITATION
    threshold = chosen.threshold if score == "confidence" else -chosen.threshold
    return dataclasses.replace(
        record,
        score=score,
        threshold=threshold,
        target="risk" if target_risk is not None else "coverage",
        target_value=target_risk if target_risk is not None else target_coverage,
        delta=delta if target_risk is not None else None,
        num_validation=chosen.num_samples,
        validation_coverage=chosen.coverage,
        validation_risk=chosen.risk,
        method=f"{record.method}; threshold: {method}",
        citation=f"{TEMPERATURE_CITATION}; {citation}",
        guarantee=guarantee,
    )


def _output_path(args: argparse.Namespace) -> Path:
    source: Path = args.ckpt_path
    output: Path = args.output or source.with_name(f"{source.stem}.calibrated.ckpt")
    if output.resolve() == source.resolve():
        raise ConfigError(
            f"--output '{output}' is the checkpoint to calibrate: lorae calibrate writes a new "
            "checkpoint and never replaces its input; choose another --output."
        )
    if output.exists() and not args.force:
        raise OutputExistsError(
            f"'{output}' already exists: choose another --output, or give --force to replace it."
        )
    return output


def _validation_logits(
    configs: list[str], ckpt_path: Path, checkpoint: dict[str, Any], overrides: list[str]
) -> tuple[Tensor, Tensor]:
    """Member logits ``(M, N, C)`` and labels ``(N,)`` of the config's validation split, from
    the model built like ``lorae test`` and loaded with ``checkpoint``."""
    from lorae.cli.main import build_cli

    args = [arg for config in configs for arg in ("--config", config)] + overrides
    cli = build_cli(args, run=False, load_from=str(ckpt_path), save_config=False)
    model, datamodule = cli.model, cli.datamodule
    # on_load_checkpoint fills an adapter-only state dict: give it a copy of the mapping so the
    # checkpoint written later keeps the original content
    loaded = {**checkpoint, "state_dict": dict(checkpoint["state_dict"])}
    model.on_load_checkpoint(loaded)
    model.load_state_dict(loaded["state_dict"])
    datamodule.setup("validate")
    try:
        size = len(datamodule.val_dataset)
    except TypeError:  # a dataset without a length: run it and see
        size = None
    if size == 0:
        raise ConfigError(
            "The data has no validation split, and lorae calibrate fits the temperature and "
            "the threshold on it: give the data module one (e.g. "
            "--data.init_args.val_fraction=0.1)."
        )
    trainer = cli.trainer
    device = trainer.strategy.root_device
    model.to(device)
    try:
        return collect_member_logits(
            model,
            datamodule.val_dataloader(),
            lambda batch: move_data_to_device(batch, device),
            forward_context=trainer.precision_plugin.forward_context,
        )
    except ValueError as error:  # no batches at all
        raise ConfigError(f"The validation split yielded no samples ({error}).") from error


def main(argv: list[str]) -> int:
    """Entry point of ``lorae calibrate``."""
    args, overrides = _parser().parse_known_args(argv)
    threshold_options = [o for o in ("delta", "score") if getattr(args, o) is not None]
    if args.target_risk is not None and args.target_coverage is not None:
        raise ConfigError(
            "Give either --target_risk or --target_coverage, not both: one threshold meets one "
            "target."
        )
    if args.target_risk is None and args.target_coverage is None and threshold_options:
        raise ConfigError(
            f"--{threshold_options[0]} sets up an abstention threshold: give its target, "
            "--target_risk A (error rate among accepted inputs <= A) or --target_coverage C "
            "(accept a share C of the inputs)."
        )
    if args.delta is not None and args.target_risk is None:
        raise ConfigError("--delta belongs to --target_risk (the coverage target has none).")
    if not Path(args.ckpt_path).is_file():
        raise DataNotFoundError(f"Checkpoint '{args.ckpt_path}' does not exist.")
    output = _output_path(args)
    checkpoint = cast(dict[str, Any], load_checkpoint_safely(args.ckpt_path))
    logits, target = _validation_logits(args.config, args.ckpt_path, checkpoint, overrides)
    record = calibration_from_logits(
        logits,
        target,
        score=args.score or "confidence",
        target_risk=args.target_risk,
        target_coverage=args.target_coverage,
        delta=0.1 if args.delta is None else args.delta,
        temperature_fraction=args.temperature_fraction,
        seed=args.seed,
    )
    with atomic_path(output) as partial:
        torch.save({**checkpoint, CALIBRATION_KEY: record.to_record()}, partial)
    print(
        f"Temperature {record.temperature:.4g} (validation NLL {record.nll_before:.4f} -> "
        f"{record.nll_after:.4f}, {record.num_temperature} samples)"
    )
    if record.threshold is not None:
        side = ">=" if record.score == "confidence" else "<="
        print(
            f"Abstention: accept when {record.score} {side} {record.threshold:.6g}; on "
            f"{record.num_validation} validation samples: coverage "
            f"{record.validation_coverage:.4f}, risk {record.validation_risk:.4f}"
        )
        print(f"Guarantee: {record.guarantee}")
    print(f"Calibrated checkpoint written to {output}")
    return 0
