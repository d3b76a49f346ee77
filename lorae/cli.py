"""The ``lorae`` command: a LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

``lorae fit --config configs/quickstart.yaml`` trains (and tests with ``test_after_fit``);
``lorae test --config X --ckpt_path Y`` evaluates a checkpoint and writes ``metrics.json``
next to its logs; ``lorae predict`` writes per-sample predictions.
"""

from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lorae import methods, tools
from lorae.adapters import is_adapter_checkpoint
from lorae.analysis.report import attach_test_callbacks, test_report
from lorae.data.base import ClassificationDataModule
from lorae.errors import ConfigError, LoraeError
from lorae.methods.base import EnsembleMethod
from lorae.module import EnsembleClassifier
from lorae.outputs import PredictionWriter, write_metrics
from lorae.training import SafeCheckpointIO, load_checkpoint_safely, out_of_memory_message


def unknown_method_check(message: str) -> None:
    """Raise :class:`ConfigError` listing lorae's methods if ``message`` (a parse error)
    says the ``model.method`` class could not be found."""
    if 'key "model.method"' not in message or "callable class" not in message:
        return
    found = re.search(r"class_path='([^']*)'", message)
    if found is None:
        return
    name = found.group(1)
    module_name, _, attribute = name.rpartition(".")
    try:
        getattr(importlib.import_module(module_name or name), attribute)
        return  # the class exists: the error is about its options
    except (ImportError, AttributeError, ValueError):
        pass
    classes = [getattr(methods, n) for n in dir(methods)]
    known = sorted(
        f"lorae.methods.{c.__name__}"
        for c in classes
        if isinstance(c, type) and issubclass(c, EnsembleMethod) and c is not EnsembleMethod
    )
    raise ConfigError(
        f"Unknown method {name!r} (model.method.class_path). Known methods: "
        f"{', '.join(known)}; or the import path of your own EnsembleMethod subclass."
    )


class LoraeCLI(LightningCLI):
    """LightningCLI with lorae's links, defaults and result files."""

    #: set by :meth:`parse_arguments`: the ``--ckpt_path`` file holds only adapters.
    adapter_checkpoint: bool = False

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        # Data sets with a loss weighting of their own (HAM10000) expose it; others give None.
        parser.link_arguments("data.class_weights", "model.class_weights", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, evaluate the best (or last) checkpoint on the test split and "
            "write metrics.json (ignored by other subcommands).",
        )
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.add_argument(
            "--calibrate",
            type=Literal["temperature"] | None,
            default=None,
            help="Before testing, fit one softmax temperature on the validation split "
            "(paper appendix K) and report every test metric also under test/calibrated/.",
        )
        parser.add_argument(
            "--temperature_sweep",
            type=list[float] | None,
            default=None,
            help="Also report the test metrics at each of these fixed temperatures (paper "
            "Tab. 17), e.g. [0.5,1,2]; keys test/temperature/<T>/..., table "
            "temperature_sweep.md.",
        )
        parser.add_argument(
            "--plots",
            type=bool | None,
            default=None,
            help="Save reliability diagrams and evaluation figures as PNG and log them to "
            "TensorBoard (default: when matplotlib, the plots extra, is installed).",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then check that a ``--ckpt_path`` file loads as data only: LightningCLI reads
        it for hyperparameters before anything else, and its error would be a traceback.
        An unknown ``model.method`` class is reported with the list of lorae's methods."""
        # The subcommand parsers report their own errors (LightningCLI keeps them privately).
        parsers = [parser, *getattr(self, "_subcommand_parsers", {}).values()]
        for each in parsers:
            each.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            unknown_method_check(str(error))
            for each in parsers:
                each.exit_on_error = True  # any other error: jsonargparse's usual report
            super().parse_arguments(parser, args)
        finally:
            for each in parsers:
                each.exit_on_error = True
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            self.adapter_checkpoint = is_adapter_checkpoint(load_checkpoint_safely(ckpt_path))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with :class:`SafeCheckpointIO` (atomic writes, data-only loading)
        unless the config brings a checkpoint plugin of its own."""
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, SafeCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def before_instantiate_classes(self) -> None:
        """Evaluating a checkpoint needs no pretrained download: the checkpoint holds every
        weight, the frozen backbone included, so the backbone is built randomly initialised
        and then overwritten. This keeps `lorae test` working on machines without internet.
        An adapter-only checkpoint (``model.checkpoint: adapters``) lacks the backbone: the
        configured ``pretrained`` weights are loaded (and checked against its fingerprint).

        Resuming (``fit --ckpt_path``) writes into the interrupted run's folder, so the saved
        ``config.yaml`` there may be overwritten instead of aborting the resume.
        """
        if self.subcommand is None:  # run=False (e.g. `lorae crossval`): no checkpoint here
            return
        config = self.config[self.subcommand]
        if self.subcommand == "fit" and config.get("ckpt_path"):
            self.save_config_kwargs["overwrite"] = True
        if self.subcommand == "fit" or not config.get("ckpt_path"):
            return
        if self.adapter_checkpoint:  # it needs the pretrained backbone
            return
        init_args = config.model.method.get("init_args")
        if init_args is not None and init_args.get("pretrained") not in (None, False):
            init_args.pretrained = False

    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does, keeping a ``model.class_weights`` set in the config.

        The link ``data.class_weights -> model.class_weights`` replaces the config's value with
        the data module's (``None`` for most data sets); weights given by hand are applied
        after it, and giving them next to a data set's own weights (HAM10000) is an error.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        explicit = config.model.get("class_weights")
        super().instantiate_classes()
        if explicit is None:
            return
        if self.datamodule.class_weights is not None:
            raise ConfigError(
                "model.class_weights is set, but the data module brings its own class weights "
                "(e.g. HAM10000's class_weight_beta): remove model.class_weights, or set the "
                "data module's weighting off (HAM10000: class_weight_beta: null)."
            )
        if len(explicit) != self.model.num_classes:
            raise ConfigError(
                f"class_weights has {len(explicit)} entries but the data has "
                f"{self.model.num_classes} classes: give one weight per class or none."
            )
        self.model.class_weights = torch.tensor(explicit, dtype=torch.float32)

    def _attach_evaluation(self) -> None:
        config = self.config[self.subcommand]
        attach_test_callbacks(
            self.trainer, self.model, config.get("calibrate"), config.get("temperature_sweep")
        )

    def before_fit(self) -> None:
        self._attach_evaluation()

    def before_test(self) -> None:
        self._attach_evaluation()

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
        report = test_report(
            self.trainer, self.model, ckpt_path, self.config[self.subcommand].get("plots")
        )
        if self.trainer.is_global_zero:  # one writer: under DDP every rank holds the same values
            path = write_metrics(
                log_dir / "metrics.json",
                metrics,
                {"checkpoint": ckpt_path, "method": self.model.method.identity(), **report},
            )
            print(f"Test metrics written to {path}")
        self.trainer.strategy.barrier()


def build_cli(args: list[str] | None, run: bool = True) -> LoraeCLI:
    """The one way lorae builds its LightningCLI (the ``lorae`` command and tools such as
    ``lorae crossval`` share it, so defaults cannot drift apart).

    Args:
        args: command-line arguments; ``None`` reads ``sys.argv``. With ``run=False`` they
            hold no subcommand, only options.
        run: run the subcommand (``False``: only build model, data and trainer).
    """
    return LoraeCLI(
        EnsembleClassifier,
        ClassificationDataModule,
        subclass_mode_data=True,
        trainer_defaults={"gradient_clip_val": 1.0},
        args=args,
        run=run,
        auto_configure_optimizers=False,
        parser_kwargs={
            "description": "lorae: LoRA-Ensemble, calibrated uncertainty from one frozen "
            "transformer. Subcommands: fit, validate, test, predict; each takes "
            "--config FILE and any option as --key=value (see --help of a subcommand)."
            + (f"\nTools (lorae TOOL --help):\n{tools.describe()}" if tools.TOOLS else ""),
            "formatter_class": argparse.RawDescriptionHelpFormatter,
        },
    )


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
        build_cli(args)
    except SIGTERMException as error:
        # Lightning stops a pre-empted run with a SystemExit of code 0; a scheduler must not
        # take it for a finished job. 128 + 15 is the shell's code for "ended by SIGTERM".
        raise SystemExit(128 + signal.SIGTERM) from error
    except torch.OutOfMemoryError as error:
        print(f"lorae: error: {out_of_memory_message(error)}", file=sys.stderr)
        raise SystemExit(2) from error
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
