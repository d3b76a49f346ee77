"""The ``lorae`` command: a LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

``lorae fit --config configs/quickstart.yaml`` trains (and tests with ``test_after_fit``);
``lorae test --config X --ckpt_path Y`` evaluates a checkpoint and writes ``metrics.json``
next to its logs; ``lorae predict`` writes per-sample predictions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lorae import tools
from lorae.data.base import ClassificationDataModule
from lorae.errors import LoraeError
from lorae.module import EnsembleClassifier
from lorae.outputs import PredictionWriter, write_metrics


class LoraeCLI(LightningCLI):
    """LightningCLI with lorae's links, defaults and result files."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, evaluate the best (or last) checkpoint on the test split and "
            "write metrics.json (ignored by other subcommands).",
        )
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")

    def before_instantiate_classes(self) -> None:
        """Evaluating a checkpoint needs no pretrained download: the checkpoint holds every
        weight, the frozen backbone included, so the backbone is built randomly initialised
        and then overwritten. This keeps `lorae test` working on machines without internet.
        """
        config = self.config[self.subcommand]
        if self.subcommand == "fit" or not config.get("ckpt_path"):
            return
        init_args = config.model.method.get("init_args")
        if init_args is not None and init_args.get("pretrained") not in (None, False):
            init_args.pretrained = False

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        callback = self.trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        ckpt_path = best or None
        print(f"\nTesting {'checkpoint ' + best if best else 'the final weights'}")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)
        self._write_test_metrics(ckpt_path)

    def after_test(self) -> None:
        self._write_test_metrics(self.config[self.subcommand].get("ckpt_path"))

    def after_predict(self) -> None:
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]  # set at runtime
        writer = next(c for c in callbacks if isinstance(c, PredictionWriter))
        if writer.written is not None:
            print(f"Predictions written to {writer.written}")

    def _write_test_metrics(self, ckpt_path: str | None) -> None:
        metrics = {k: v for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        path = write_metrics(
            log_dir / "metrics.json",
            metrics,
            {"checkpoint": ckpt_path, "method": self.model.method.identity()},
        )
        print(f"Test metrics written to {path}")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lorae`` console script and ``python -m lorae``.

    The first argument picks a Lightning subcommand (``fit``, ``validate``, ``test``,
    ``predict``) or one of lorae's own tools (:data:`lorae.tools.TOOLS`).
    """
    argv = sys.argv[1:] if args is None else args
    try:
        if argv and argv[0] in tools.TOOLS:
            code = tools.resolve(argv[0])(argv[1:])
            if code:
                raise SystemExit(code)
            return
        LoraeCLI(
            EnsembleClassifier,
            ClassificationDataModule,
            subclass_mode_data=True,
            trainer_defaults={"gradient_clip_val": 1.0},
            args=args,
            auto_configure_optimizers=False,
            parser_kwargs={
                "description": "lorae: LoRA-Ensemble, calibrated uncertainty from one frozen "
                "transformer. Subcommands: fit, validate, test, predict; each takes "
                "--config FILE and any option as --key=value (see --help of a subcommand)."
                + (f"\nTools (lorae TOOL --help):\n{tools.describe()}" if tools.TOOLS else ""),
                "formatter_class": argparse.RawDescriptionHelpFormatter,
            },
        )
    except Exception as error:
        # jsonargparse re-raises errors from building a subclass-typed argument (the data
        # module) as its own ValueError; the user's error is in the cause chain.
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, LoraeError):
            cause = cause.__cause__
        if cause is None:
            raise
        print(f"lorae: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from error
