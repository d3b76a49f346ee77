"""Pretrain the backbone inside ``lorae fit`` (paper appendix J), before the LoRA members train.

Appendix J of the paper ("LoRA-Ensemble Fine-Tuned on the Same Dataset as the Backbone Model"):
"we initialized the LoRA ensemble with weights from a single network trained for 65 epochs on
HAM10000, and subsequently fine-tuned it for one epoch without learning rate warmup [...] even
in this scenario, the LoRA-Ensemble improves both performance and calibration". LoRA-Ensemble
needs a *pretrained* frozen backbone; where none can be downloaded (offline machines, the
quickstart) :class:`PretrainBackbone` makes one in the same command: it trains the method's
backbone plus a plain linear head with cross-entropy (full fine-tuning, a small seeded loop of
its own), writes the result into the method's frozen weights, and only then does Lightning
train the members' LoRA factors and heads on top of it.

Data: the data module's pretraining part when it carves one (``pretrain_dataset``, e.g.
:class:`lorae.data.DigitsDataModule`'s ``pretrain_fraction``: disjoint from the images the
members then train on, like the paper's main transfer setting), else its training split (the
literal appendix J setting: both stages see the same images). Test and validation images are
never trained on; the validation split only measures the pretrained network.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lorae.backbones.base import Backbone
from lorae.errors import ConfigError
from lorae.lora import lora_layers
from lorae.methods.base import EnsembleMethod
from lorae.methods.lora_ensemble import LoRAEnsemble, LoRANetworkMethod
from lorae.methods.single import SingleNetwork

__all__ = [
    "PRETRAIN_RECORD",
    "PRETRAIN_WEIGHTS",
    "PretrainBackbone",
    "PretrainRecord",
    "pretrain_backbone",
    "shared_backbone",
    "unwrapped_lora",
]

#: File names the callback writes into the run folder (the logger's ``log_dir``).
PRETRAIN_RECORD = "pretrain.json"
PRETRAIN_WEIGHTS = "pretrained_backbone.safetensors"

PretrainSource = Literal["pretrain_split", "train_split"]


@runtime_checkable
class HasPretrainSplit(Protocol):
    """A data module that carves a part of its training data for pretraining only."""

    @property
    def pretrain_dataset(self) -> Dataset[Any] | None: ...


@dataclass
class PretrainRecord:
    """What pretraining did, written as ``pretrain.json`` and kept in the checkpoints.

    Attributes:
        source: ``"pretrain_split"`` (the data module's pretraining part) or
            ``"train_split"`` (the training split itself, appendix J's literal setting).
        samples: images pretrained on.
        epochs, lr, weight_decay, batch_size, seed: the settings used.
        train_loss, train_acc: per epoch, running means over that epoch's batches.
        val_acc, val_nll: the pretrained network (backbone + linear head) on the validation
            split, which it never trained on; ``None`` without a validation split.
        seconds: wall time of the pretraining.
        weights: the written backbone weights file (timm's own key layout, loadable as
            ``pretrained: <file>``), or ``None``.
    """

    source: PretrainSource
    samples: int
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    seed: int
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_acc: float | None = None
    val_nll: float | None = None
    seconds: float = 0.0
    weights: str | None = None

    def summary(self) -> str:
        """One line for the log."""
        val = "" if self.val_acc is None else f", validation accuracy {self.val_acc:.3f}"
        return (
            f"lorae: pretrained the backbone (appendix J) for {self.epochs} epochs on "
            f"{self.samples} images ({self.source.replace('_', ' ')}) in {self.seconds:.0f} s: "
            f"last-epoch training accuracy {self.train_acc[-1] if self.train_acc else math.nan:.3f}"
            f"{val}. The LoRA members now train on the frozen pretrained weights."
        )


def shared_backbone(method: EnsembleMethod) -> Backbone:
    """The one backbone of ``method`` that pretraining fills.

    Supported: :class:`~lorae.methods.LoRAEnsemble` (also ``num_members: 1``, the single
    network with LoRA), the methods built on one LoRA network (Snapshot Ensemble, Bayes-LoRA)
    and :class:`~lorae.methods.SingleNetwork`: their backbone is the plain network, with LoRA
    layers at most. Other methods change the network itself (stacked copies, FiLM or
    BatchEnsemble layers, DropKey), so a plain forward pass would not train the same weights.

    Raises:
        ConfigError: the method is not one of these.
    """
    if isinstance(method, LoRAEnsemble | SingleNetwork):
        return method.backbone
    if isinstance(method, LoRANetworkMethod):
        return method.network.backbone
    raise ConfigError(
        f"PretrainBackbone pretrains the one backbone of LoRAEnsemble, SingleNetwork, "
        f"SnapshotEnsemble or BayesLoRA; {type(method).__name__} changes the network itself. "
        "Pretrain with one of them, then pass the written weights file as "
        "`model.method.init_args.pretrained`."
    )


@contextlib.contextmanager
def unwrapped_lora(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every LoRA-Ensemble layer replaced by the linear layer it wraps, all
    weights trainable and in training mode; on exit the LoRA layers, the ``requires_grad``
    flags and the mode are put back exactly.

    The base linears are the LoRA layers' own (same tensors, not copies), so training the
    unwrapped model trains the frozen weights the members then share, and the LoRA factors
    (drawn when the method was built, ``B = 0``) are untouched: the members start as usual.
    """
    layers = lora_layers(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    try:
        model.requires_grad_(True)
        model.train()
        yield model
    finally:
        for name, layer in layers.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        model.train(was_training)


def _loader(
    dataset: Dataset[Any],
    batch_size: int,
    collate_fn: Any,
    generator: torch.Generator | None = None,
) -> DataLoader[Any]:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=generator is not None,
        generator=generator,
        collate_fn=collate_fn,
    )


def _step_lr(
    optimizer: torch.optim.Optimizer, lr: float, step: int, total: int, warmup: int
) -> None:
    """Linear warm-up, then cosine decay to 0 (the paper's ViT schedule, appendix M)."""
    if step < warmup:
        factor = (step + 1) / (warmup + 1)
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = lr * factor


@torch.no_grad()
def _evaluate(
    network: nn.Module, loader: DataLoader[Any], device: torch.device
) -> tuple[float, float]:
    """Accuracy and NLL of ``network`` on ``loader`` (eval mode restored to train after)."""
    network.eval()
    correct, nll, total = 0, 0.0, 0
    for inputs, target in loader:
        inputs, target = inputs.to(device), target.to(device)
        logits = network(inputs)
        nll += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
        total += int(target.shape[0])
    network.train()
    return correct / max(1, total), nll / max(1, total)


def pretrain_backbone(
    backbone: Backbone,
    num_classes: int,
    train: Dataset[Any],
    record: PretrainRecord,
    val: Dataset[Any] | None = None,
    collate_fn: Any = None,
    device: torch.device | None = None,
    max_steps: int | None = None,
    batches_per_epoch: int | None = None,
) -> PretrainRecord:
    """Train ``backbone`` (LoRA layers unwrapped) plus a new linear head with cross-entropy.

    Full fine-tuning with AdamW, one epoch of linear warm-up then cosine decay; seeded with
    ``record.seed`` (head init, shuffling, dropout) inside a forked RNG, so the caller's random
    stream is the same as without pretraining. The head is discarded afterwards: the ensemble
    members bring their own (the paper: "we entirely discard its last layer and add a new one
    [...] which we train from scratch").

    Args:
        backbone: trained in place; its LoRA factors stay as they are.
        num_classes: C of the temporary head.
        train: ``(input, target)`` samples to pretrain on.
        record: the settings (epochs, lr, ...); its results are filled in and it is returned.
        val: measured after pretraining (never trained on), or ``None``.
        collate_fn: the data module's collate function (``None``: PyTorch's default).
        device: where to train (default: where the backbone is).
        max_steps: stop after this many optimizer steps (``fast_dev_run``); ``None``: all.
        batches_per_epoch: at most this many batches per epoch (the trainer's integer
            ``limit_train_batches``, for smoke tests); ``None``: the whole loader.
    """
    device = device or next(backbone.parameters()).device
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(record.seed)
        generator = torch.Generator().manual_seed(record.seed)
        head = nn.Linear(backbone.feature_dim, num_classes).to(device)
        loader = _loader(train, record.batch_size, collate_fn, generator)
        per_epoch = min(len(loader), batches_per_epoch or len(loader))
        total = record.epochs * per_epoch
        if max_steps is not None:
            total = min(total, max_steps)
        with unwrapped_lora(backbone.model):
            network = nn.Sequential(backbone, head)
            optimizer = torch.optim.AdamW(
                network.parameters(), lr=record.lr, weight_decay=record.weight_decay
            )
            step = 0
            for _ in range(record.epochs):
                loss_sum, correct, seen = 0.0, 0, 0
                for batch_index, (inputs, target) in enumerate(loader):
                    if step >= total or batch_index >= per_epoch:
                        break
                    inputs, target = inputs.to(device), target.to(device)
                    _step_lr(optimizer, record.lr, step, total, min(per_epoch, total - 1))
                    logits = network(inputs)
                    loss = F.cross_entropy(logits, target)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    loss_sum += float(loss.detach()) * int(target.shape[0])
                    correct += int((logits.detach().argmax(-1) == target).sum())
                    seen += int(target.shape[0])
                if seen:
                    record.train_loss.append(loss_sum / seen)
                    record.train_acc.append(correct / seen)
            if val is not None:
                record.val_acc, record.val_nll = _evaluate(
                    network, _loader(val, 256, collate_fn), device
                )
    record.seconds = time.perf_counter() - start
    return record


def plain_state_dict(backbone: Backbone) -> dict[str, Tensor]:
    """The backbone network's weights under its own key names (LoRA layers unwrapped): for a
    timm ViT, timm's layout, which ``pretrained: <file>`` loads."""
    with unwrapped_lora(backbone.model) as model:
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


class PretrainBackbone(Callback):
    """Pretrain the method's frozen backbone at the start of ``fit`` (paper appendix J).

    In ``on_fit_start`` (after a checkpoint would have been restored, before the first
    training step) the method's backbone and a new linear head are trained with cross-entropy
    for ``epochs`` epochs on the data module's ``pretrain_dataset`` when it has one, else on
    its training split (see :mod:`lorae.training.pretrain`). The trained weights replace the
    method's frozen backbone weights in place; the LoRA factors and member heads the method
    built are untouched, so the members start exactly as they would on a downloaded backbone.
    Then Lightning trains the members as usual.

    Pretraining happens once per run: the callback's state (its :class:`PretrainRecord`) is
    stored in every checkpoint and a resumed run (``fit --ckpt_path``) skips it, because the
    checkpoint already holds the pretrained backbone. The run folder gets ``pretrain.json``
    (settings, per-epoch loss and accuracy, validation accuracy of the pretrained network) and
    ``pretrained_backbone.safetensors`` (the backbone in its own key layout: another run can
    use it as ``model.method.init_args.pretrained``); the logger gets ``pretrain/*`` values.

    Args:
        epochs: pretraining epochs over the pretraining data.
        lr: peak AdamW learning rate (one epoch of warm-up, then cosine decay).
        weight_decay: AdamW weight decay.
        batch_size: pretraining batch size.
        seed: seed of the head init, shuffle and dropout; ``None`` takes
            ``torch.initial_seed()``, i.e. ``seed_everything``'s seed.
        save_weights: write ``pretrained_backbone.safetensors`` into the run folder.

    Raises:
        ConfigError: an argument is out of range, the method has no single plain backbone
            (:func:`shared_backbone`), or checkpoints are adapter-only (they would not hold
            the pretrained weights, and a resumed or tested run would lose them).
    """

    def __init__(
        self,
        epochs: int = 30,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        batch_size: int = 64,
        seed: int | None = None,
        save_weights: bool = True,
    ) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"PretrainBackbone epochs must be an integer >= 1, got {epochs!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"PretrainBackbone batch_size must be >= 1, got {batch_size!r}.")
        if not lr > 0 or weight_decay < 0:
            raise ConfigError(
                f"PretrainBackbone needs lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}."
            )
        self.epochs = epochs
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.batch_size = batch_size
        self.seed = seed
        self.save_weights = save_weights
        self.record: PretrainRecord | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check before anything trains that the method and checkpoint format fit."""
        if stage != "fit":
            return
        shared_backbone(_method(pl_module))
        if getattr(pl_module, "checkpoint_contents", "full") == "adapters":
            raise ConfigError(
                "PretrainBackbone changes the frozen backbone weights, which adapter-only "
                "checkpoints (model.checkpoint: adapters) do not store: use "
                "model.checkpoint: full, or pretrain once and pass the written "
                f"{PRETRAIN_WEIGHTS} as model.method.init_args.pretrained."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Pretrain, unless a restored checkpoint says it was done."""
        if self.record is not None:
            pl_module.print(
                "lorae: pretraining skipped, the resumed checkpoint holds the pretrained backbone."
            )
            return
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set at runtime
        if datamodule is None:
            raise ConfigError("PretrainBackbone needs a data module (lorae fit gives one).")
        pretrain = datamodule.pretrain_dataset if isinstance(datamodule, HasPretrainSplit) else None
        source: PretrainSource = "pretrain_split" if pretrain is not None else "train_split"
        dataset = pretrain if pretrain is not None else datamodule.train_dataset
        method = _method(pl_module)
        record = PretrainRecord(
            source=source,
            samples=len(dataset) if isinstance(dataset, Sized) else -1,
            epochs=self.epochs,
            lr=self.lr,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            seed=torch.initial_seed() if self.seed is None else self.seed,
        )
        pretrain_backbone(
            shared_backbone(method),
            method.num_classes,
            dataset,
            record,
            val=datamodule.val_dataset,
            collate_fn=getattr(datamodule, "collate_fn", None),
            device=pl_module.device,
            max_steps=1 if getattr(trainer, "fast_dev_run", False) else None,
            batches_per_epoch=_batch_limit(trainer),
        )
        self.record = record
        self._write(trainer, method)
        pl_module.print(record.summary())

    def _write(self, trainer: pl.Trainer, method: EnsembleMethod) -> None:
        assert self.record is not None
        values = {"pretrain/train_acc": self.record.train_acc[-1]}
        if self.record.val_acc is not None and self.record.val_nll is not None:
            values |= {
                "pretrain/val_acc": self.record.val_acc,
                "pretrain/val_nll": self.record.val_nll,
            }
        for logger in trainer.loggers:
            logger.log_metrics(values, step=0)
        if not trainer.is_global_zero or trainer.log_dir is None:
            return
        folder = Path(trainer.log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        if self.save_weights:
            from safetensors.torch import save

            weights = folder / PRETRAIN_WEIGHTS
            _write_file(weights, save(plain_state_dict(shared_backbone(method))))
            self.record.weights = str(weights)
        text = json.dumps(asdict(self.record), indent=1) + "\n"
        _write_file(folder / PRETRAIN_RECORD, text.encode())

    def state_dict(self) -> dict[str, Any]:
        """The record of the pretraining done, so a resumed run does not repeat it."""
        return {"record": None if self.record is None else asdict(self.record)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        record = state_dict.get("record")
        self.record = None if record is None else PretrainRecord(**record)


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` through a temporary file and a rename, so no reader sees half a file
    (lorae.checkpoints' writer lies on this package's layer, so it is not imported)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _method(pl_module: pl.LightningModule) -> EnsembleMethod:
    method = getattr(pl_module, "method", None)
    if not isinstance(method, EnsembleMethod):
        raise ConfigError(
            "PretrainBackbone needs lorae's EnsembleClassifier (a module with a `method`), "
            f"got {type(pl_module).__name__}."
        )
    return method


def _batch_limit(trainer: pl.Trainer) -> int | None:
    """The trainer's ``limit_train_batches`` when it is a batch count (a smoke test's
    ``--trainer.limit_train_batches=2`` limits pretraining too); ``None`` for a fraction."""
    limit = getattr(trainer, "limit_train_batches", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None
