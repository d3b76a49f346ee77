"""The ``lorae`` command: a LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

``lorae fit --config configs/quickstart.yaml`` trains (and tests with ``test_after_fit``);
``lorae test --config X --ckpt_path Y`` evaluates a checkpoint and writes ``metrics.json``
next to its logs; ``lorae predict`` writes per-sample predictions.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import signal
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import (
    ArgsType,
    LightningArgumentParser,
    LightningCLI,
)
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lorae import methods
from lorae.backbones import backbone_preprocessing
from lorae.checkpoints.adapters import is_adapter_checkpoint
from lorae.checkpoints.inference import prediction_config
from lorae.checkpoints.safe import SafeCheckpointIO, load_checkpoint_safely
from lorae.cli import tools
from lorae.cli.compose import expand_config_args
from lorae.cli.run_checks import FreshConfigFile, checkpoint_to_evaluate
from lorae.data.base import ClassificationDataModule
from lorae.errors import ConfigError, DataNotFoundError, LoraeError
from lorae.evaluation.callback import TestProtocol
from lorae.evaluation.outputs import PredictionWriter
from lorae.module import EnsembleClassifier
from lorae.training import out_of_memory_message


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
    known = sorted(methods.class_path(cls) for cls in methods.METHODS.values())
    raise ConfigError(
        f"Unknown method {name!r} (model.method.class_path). Known methods: "
        f"{', '.join(known)}; or the import path of your own EnsembleMethod subclass."
    )


def _option(args: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``args`` (the last one given)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def config_from_checkpoint(args: list[str]) -> list[str]:
    """``predict --ckpt_path K --data.predict_path P`` without ``--config``: prepend the config
    rebuilt from the checkpoint's records (:func:`lorae.checkpoints.inference.
    prediction_config`), so model and data go through the usual parser. Other arguments are
    returned unchanged; options given on the command line override the rebuilt ones.

    Raises:
        DataNotFoundError: the checkpoint does not exist.
        CheckpointReadError: the checkpoint predates the records (pass ``--config``).
    """
    if not args or args[0] != "predict" or _option(args, "--data.predict_path") is None:
        return args
    if any(a in ("--config", "-c") or a.startswith("--config=") for a in args):
        return args
    ckpt_path = _option(args, "--ckpt_path")
    if ckpt_path is None:
        raise ConfigError(
            "`lorae predict --data.predict_path` without --config needs --ckpt_path: the "
            "checkpoint holds the model and how it reads its inputs."
        )
    if not Path(ckpt_path).is_file():  # the checkpoint is this command's only source
        raise DataNotFoundError(
            f"Checkpoint '{ckpt_path}' does not exist: give --ckpt_path the path of a .ckpt "
            "file written by `lorae fit`, e.g. runs/quickstart/version_0/checkpoints/best.ckpt."
        )
    checkpoint = load_checkpoint_safely(ckpt_path)
    config = prediction_config(checkpoint, f"Checkpoint '{ckpt_path}'")
    return [args[0], "--config", json.dumps(config), *args[1:]]


#: ``--ckpt_path`` values that name no file but a checkpoint Lightning looks up.
LIGHTNING_CHECKPOINT_NAMES = ("last", "best", "hpc", "registry")

#: Top-level keys of a run's saved ``config.yaml`` that belong to the ``fit`` subcommand, not
#: to the model, data and trainer a tool (``run=False``) builds.
SUBCOMMAND_KEYS = ("ckpt_path", "weights_only")


class LoraeCLI(LightningCLI):
    """LightningCLI with lorae's links, defaults and result files."""

    #: set by :meth:`parse_arguments`: the ``--ckpt_path`` file holds only adapters.
    adapter_checkpoint: bool = False

    def __init__(
        self,
        args: ArgsType = None,
        run: bool = True,
        load_from: str | None = None,
        save_config: bool = True,
    ) -> None:
        """See :func:`build_cli`, the one way lorae builds it."""
        self.load_from = load_from
        self._run = run
        self._parsers: list[LightningArgumentParser] = []
        super().__init__(
            EnsembleClassifier,
            ClassificationDataModule,
            save_config_callback=FreshConfigFile if save_config else None,
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

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        self._parsers.append(parser)
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        # The backbone owns its input format (image size and normalisation, or tokenizer):
        # the data module is told, so a config names its backbone once, in the method.
        parser.link_arguments(
            ("model.method.init_args.backbone", "model.method.init_args.pretrained"),
            "data.init_args.preprocessing",
            compute_fn=backbone_preprocessing,
            apply_on="parse",
        )
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
        # The test protocol is a trainer callback like the prediction writer; its options keep
        # their short top-level names (--calibrate, ...), linked into it.
        parser.add_lightning_class_args(TestProtocol, "test_protocol")
        for option in ("calibrate", "temperature_sweep", "plots"):
            parser.link_arguments(option, f"test_protocol.{option}")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then check that a ``--ckpt_path`` file loads as data only: LightningCLI reads
        it for hyperparameters before anything else, and its error would be a traceback.
        An unknown ``model.method`` class is reported with the list of lorae's methods.
        A ``--config`` file with a ``base:`` key is composed first (:mod:`lorae.cli.compose`)."""
        if isinstance(args, list) or args is None:
            # Without a subcommand (the tools) a run's saved config.yaml is read without the
            # keys only `fit` accepts.
            drop = () if self._run else SUBCOMMAND_KEYS
            given = expand_config_args(sys.argv[1:] if args is None else args, drop)
            rebuilt = config_from_checkpoint(given)
            if rebuilt is not given:  # the config is the checkpoint's: no config.yaml to save
                self.save_config_callback = None
            if args is None:  # LightningCLI then reads sys.argv (and warns if given both)
                sys.argv[1:] = rebuilt
            else:
                args = rebuilt
        # Every parser reports its own errors: the main one and each subcommand's, as
        # recorded by add_arguments_to_parser (LightningCLI calls it for each of them).
        parsers = [parser, *self._parsers]
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
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else self.load_from
        if ckpt_path and Path(ckpt_path).is_file():
            self.adapter_checkpoint = is_adapter_checkpoint(load_checkpoint_safely(ckpt_path))
        elif ckpt_path and ckpt_path not in LIGHTNING_CHECKPOINT_NAMES:
            # Before anything is built or written: Lightning would fail after saving config.yaml.
            raise DataNotFoundError(
                f"Checkpoint '{ckpt_path}' does not exist: give --ckpt_path the path of a .ckpt "
                "file written by `lorae fit`"
                + (" (or `last` to resume from the newest one)." if subcommand == "fit" else ".")
            )

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
        ``pretrained`` given as a local path that exists is kept: reading it downloads
        nothing, and a Hugging Face folder's ``config.json`` gives the architecture the
        checkpoint holds where it is not the backbone name's.
        An adapter-only checkpoint (``model.checkpoint: adapters``) lacks the backbone: the
        configured ``pretrained`` weights are loaded (and checked against its fingerprint).

        Resuming (``fit --ckpt_path``) writes into the interrupted run's folder, so the saved
        ``config.yaml`` there may be overwritten instead of aborting the resume.
        """
        if self.subcommand is None:  # run=False: a tool builds the classes (`lorae analyze`)
            config, ckpt_path, fit = self.config, self.load_from, False
        else:
            config = self.config[self.subcommand]
            ckpt_path, fit = config.get("ckpt_path"), self.subcommand == "fit"
        if fit and ckpt_path:
            self.save_config_kwargs["overwrite"] = True
        if fit or not ckpt_path:
            return
        if self.adapter_checkpoint:  # it needs the pretrained backbone
            return
        init_args = config.model.method.get("init_args")
        pretrained = None if init_args is None else init_args.get("pretrained")
        if pretrained in (None, False):
            return
        if isinstance(pretrained, str) and Path(pretrained).expanduser().exists():
            # Local weights cost no download, and a Hugging Face folder's config.json is the
            # architecture the checkpoint was trained with (it may differ from the backbone
            # name's, e.g. a smaller BERT saved under a BERT name): build from it.
            return
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

    def _check_checkpoint(self) -> None:
        assert self.subcommand is not None
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        checkpoint_to_evaluate(self.trainer, ckpt_path, self.subcommand)

    def before_validate(self) -> None:
        self._check_checkpoint()

    def before_test(self) -> None:
        self._check_checkpoint()

    def before_predict(self) -> None:
        self._check_checkpoint()

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        callback = self.trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        dirpath = getattr(callback, "dirpath", None)
        if best and (dirpath is None or Path(best).parent != Path(dirpath)):
            # A run resumed from a checkpoint written in another folder (moved there) restores
            # that folder's path: test the final weights rather than a stale file.
            best = ""
        ckpt_path = best or None
        print(f"\nTesting {'checkpoint ' + best if best else 'the final weights'}")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)
        self._print_test_metrics()

    def after_test(self) -> None:
        self._print_test_metrics()

    def after_predict(self) -> None:
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]  # set at runtime
        writer = next(c for c in callbacks if isinstance(c, PredictionWriter))
        if writer.written is not None:
            print(f"Predictions written to {writer.written}")

    def _print_test_metrics(self) -> None:
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]  # set at runtime
        protocol = next(c for c in callbacks if isinstance(c, TestProtocol))
        if protocol.metrics_path is not None:  # process 0 wrote it
            print(f"Test metrics written to {protocol.metrics_path}")


def build_cli(
    args: list[str] | None,
    run: bool = True,
    load_from: str | None = None,
    save_config: bool = True,
) -> LoraeCLI:
    """The one way lorae builds its LightningCLI (the ``lorae`` command and the tools
    ``lorae analyze`` and ``lorae crossval`` share it, so defaults cannot drift apart).

    Args:
        args: command-line arguments; ``None`` reads ``sys.argv``. With ``run=False`` they
            hold no subcommand, only options.
        run: run the subcommand (``False``: only build model, data and trainer).
        load_from: with ``run=False``, the checkpoint the caller will load into the model:
            a full one holds every weight, so no pretrained weights are loaded (as for
            ``lorae test --ckpt_path``).
        save_config: save the resolved ``config.yaml`` into the run's log folder.
    """
    return LoraeCLI(args, run, load_from, save_config)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lorae`` console script and ``python -m lorae``.

    The first argument picks a Lightning subcommand (``fit``, ``validate``, ``test``,
    ``predict``) or one of lorae's own tools (:data:`lorae.cli.tools.TOOLS`).
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
        while cause is not None and not isinstance(cause, LoraeError | FileSystemError):
            cause = cause.__cause__
        if cause is None:
            raise
        message = str(cause) if isinstance(cause, LoraeError) else file_system_message(cause)
        print(f"lorae: error: {message}", file=sys.stderr)
        raise SystemExit(2) from error


#: Errors of the file system a run writes into (a folder under a regular file, no permission,
#: a file where a folder must go): the user's to fix, so a message, not a traceback.
FileSystemError = NotADirectoryError | PermissionError | FileExistsError | IsADirectoryError


def file_system_message(error: OSError) -> str:
    """One line naming the path and what is wrong with it."""
    path = error.filename or "a path of the run"
    reason = error.strerror or type(error).__name__
    hint = {
        NotADirectoryError: "a part of the path is a regular file, not a folder",
        PermissionError: "this user may not write there",
        FileExistsError: "a file is in the way of a folder",
        IsADirectoryError: "a folder is where a file must be written",
    }.get(type(error), "")
    return (
        f"cannot write '{path}': {reason}" + (f" ({hint})" if hint else "") + ". Choose another "
        "folder (--trainer.default_root_dir, the logger's save_dir, --output ...) or fix this one."
    )
