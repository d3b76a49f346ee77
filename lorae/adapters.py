"""Adapter-only state: what an ensemble adds to its frozen, shared pretrained backbone.

LoRA-Ensemble (paper section 3) keeps one pretrained backbone frozen and shares it by all M
members; what makes the members different (and what training changes) are the LoRA factors
``A_i, B_i`` and the classifier heads. The backbone need not be stored with the ensemble: it
is the published pretrained weights, rebuilt from ``pretrained:``. Storing only the adapters
makes a checkpoint a small fraction of one backbone (issue 6 target: at most 12% of one full
backbone checkpoint for ViT-B/32, M = 16, rank 8) instead of a full copy of it.

- :func:`adapter_state_dict` selects the adapter tensors; :func:`frozen_fingerprint`
  identifies the frozen backbone they belong to, so adapters loaded onto other pretrained
  weights are an error instead of a silently wrong model.
- :func:`checkpoint_record`, :func:`strip_checkpoint` and :func:`restore_checkpoint` implement
  adapter-only Lightning checkpoints (``EnsembleClassifier(checkpoint="adapters")``).
- :func:`export_checkpoint` writes the adapters of a checkpoint to one ``.safetensors`` file
  (``lorae export``); :func:`load_adapters` and :func:`build_from_export` load it onto a
  freshly built backbone.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lorae import __version__
from lorae.backbones.base import Pretrained
from lorae.errors import CheckpointMismatchError, CheckpointReadError, DataNotFoundError, LoraeError
from lorae.methods.base import EnsembleMethod, describe_mismatch
from lorae.training.checkpointing import load_checkpoint_safely

__all__ = [
    "ADAPTERS_KEY",
    "EXPORT_FORMAT",
    "CheckpointContents",
    "OutputExistsError",
    "adapter_state_dict",
    "build_from_export",
    "checkpoint_record",
    "export_checkpoint",
    "fingerprint_of",
    "frozen_fingerprint",
    "frozen_state_dict",
    "is_adapter_checkpoint",
    "load_adapters",
    "method_config",
    "read_export",
    "restore_checkpoint",
    "strip_checkpoint",
    "tensor_bytes",
]

#: Checkpoint entry with what lorae needs to separate adapters from the frozen backbone.
ADAPTERS_KEY = "lorae_adapters"
#: ``format`` metadata value of an export file.
EXPORT_FORMAT = "lorae-adapters/1"
#: What a Lightning checkpoint stores: every weight, or only the adapters.
CheckpointContents = Literal["full", "adapters"]
_PREFIX = "method."  # EnsembleClassifier holds the method as ``self.method``
_PRETRAINED = "model.method.init_args.pretrained"


class OutputExistsError(LoraeError, FileExistsError):
    """The output file exists and overwriting was not asked for."""


# --- selecting and identifying the tensors -----------------------------------------------------


def _state_entries(method: nn.Module) -> Iterator[tuple[str, Tensor, bool]]:
    """``(name, tensor, frozen)`` for every entry of ``method.state_dict()`` (tied tensors
    under each of their names); ``frozen`` marks parameters with ``requires_grad=False``."""
    for name, value in method.state_dict(keep_vars=True).items():
        frozen = isinstance(value, nn.Parameter) and not value.requires_grad
        yield name, value, frozen


def adapter_state_dict(method: nn.Module) -> dict[str, Tensor]:
    """The tensors an adapter-only checkpoint stores: everything but the frozen backbone.

    Kept: every parameter with ``requires_grad=True`` (LoRA factors, heads, and whatever
    ``train_backbone`` made trainable) and every persistent buffer (Snapshot Ensemble's
    snapshots, Bayes-LoRA's posterior factors, counters, normalisation statistics). Left out:
    the frozen parameters, the pretrained weights all members share (paper section 3), which
    are rebuilt from ``pretrained:`` and checked with :func:`frozen_fingerprint`.

    Args:
        method: an :class:`~lorae.methods.EnsembleMethod` (any ``nn.Module`` works).

    Returns:
        ``{name: tensor}`` with the names of ``method.state_dict()``; detached, not copied.
    """
    return {name: value.detach() for name, value, frozen in _state_entries(method) if not frozen}


def frozen_state_dict(method: nn.Module) -> dict[str, Tensor]:
    """The complement of :func:`adapter_state_dict`: the frozen parameters by name (detached)."""
    return {name: value.detach() for name, value, frozen in _state_entries(method) if frozen}


def fingerprint_of(tensors: Mapping[str, Tensor]) -> str:
    """sha256 (hex) over the names, shapes, dtypes and bytes of ``tensors`` in sorted-name order.

    Raises:
        ValueError: a tensor is on the ``meta`` device (it has no bytes to hash).
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach()
        if value.is_meta:
            raise ValueError(f"Cannot fingerprint '{name}': it is on the meta device.")
        digest.update(f"{name}|{tuple(value.shape)}|{value.dtype}\n".encode())
        flat = value.cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def frozen_fingerprint(method: nn.Module) -> str:
    """The :func:`fingerprint_of` the method's frozen parameters (method-relative names).

    It identifies the pretrained backbone (and the architecture around it) that adapters were
    trained on: the same ``backbone`` with the same ``pretrained`` weights gives the same
    fingerprint on any device; other weights, another dtype or another architecture give
    another. Hashing reads every frozen byte (about a second per 100M parameters).
    """
    return fingerprint_of(frozen_state_dict(method))


def tensor_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Total storage bytes of ``tensors`` (``numel * element_size``; works on ``meta``)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def method_config(factory: Callable[..., Any]) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` of a method factory, or ``None`` when unknown.

    Understands the ``functools.partial`` the CLI (jsonargparse) passes as
    ``EnsembleClassifier(method=...)`` and ``functools.partial(LoRAEnsemble, ...)`` from
    Python; the arguments must be JSON data (paths become strings). Used to rebuild the method
    from an export (:func:`build_from_export`).
    """
    if not isinstance(factory, functools.partial):
        return None
    cls = [factory.func, *factory.args][-1]  # jsonargparse: partial(instantiator..., cls)
    if not (inspect.isclass(cls) and issubclass(cls, EnsembleMethod)):
        return None

    def plain(value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise TypeError(type(value).__name__)

    try:
        init_args = json.loads(json.dumps(dict(factory.keywords), default=plain))
    except (TypeError, ValueError):
        return None
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


# --- adapter-only Lightning checkpoints --------------------------------------------------------


def checkpoint_record(
    method: EnsembleMethod, contents: CheckpointContents, config: dict[str, Any] | None
) -> dict[str, Any]:
    """The :data:`ADAPTERS_KEY` entry of a checkpoint (plain data, loads with
    ``weights_only=True``): ``contents``, the method-relative names of the frozen tensors, the
    method's identity and config, and (for ``"adapters"``) the frozen fingerprint."""
    record: dict[str, Any] = {
        "contents": contents,
        "frozen_keys": sorted(frozen_state_dict(method)),
        "identity": method.identity(),
        "method_config": config,
    }
    if contents == "adapters":
        record["fingerprint"] = frozen_fingerprint(method)
    return record


def strip_checkpoint(checkpoint: dict[str, Any], record: Mapping[str, Any]) -> None:
    """Remove the frozen tensors named in ``record`` from ``checkpoint["state_dict"]``."""
    state = checkpoint.get("state_dict")
    if state is None:
        return
    for name in record["frozen_keys"]:
        state.pop(_PREFIX + name, None)


def is_adapter_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a loaded Lightning checkpoint holds only adapters (needs the pretrained
    weights to be loaded)."""
    record = checkpoint.get(ADAPTERS_KEY)
    return isinstance(record, Mapping) and record.get("contents") == "adapters"


def _pretrained_hint(config: Mapping[str, Any] | None) -> str:
    """Where to set ``pretrained`` and, when recorded, the value the adapters were trained on."""
    if not config or "pretrained" not in config.get("init_args", {}):
        return f"Set {_PRETRAINED} to the pretrained weights the adapters were trained on."
    value = config["init_args"]["pretrained"]
    if value is False:
        return (
            f"They were trained on a randomly initialised backbone ({_PRETRAINED}: false), "
            "which only the same config and seed_everything rebuild."
        )
    return f"They were trained with {_PRETRAINED}: {json.dumps(value)}; set it to those weights."


def _check_fingerprint(saved: str, current: str, source: str, config: Any) -> None:
    if saved != current:
        raise CheckpointMismatchError(
            f"{source} holds only adapters, and they were trained on different pretrained "
            f"weights than the configured model's (frozen-weight fingerprint {saved[:12]} in "
            f"the file, {current[:12]} here). {_pretrained_hint(config)}"
        )


def restore_checkpoint(checkpoint: dict[str, Any], method: EnsembleMethod) -> None:
    """Make an adapter-only checkpoint loadable with strict loading: check that ``method``'s
    frozen weights are those the adapters were trained on, then fill them into
    ``checkpoint["state_dict"]`` from ``method``. Full checkpoints are left as they are.

    Raises:
        CheckpointMismatchError: the frozen fingerprint differs (other pretrained weights).
    """
    if not is_adapter_checkpoint(checkpoint):
        return
    record = checkpoint[ADAPTERS_KEY]
    _check_fingerprint(
        record["fingerprint"],
        frozen_fingerprint(method),
        "The checkpoint",
        record.get("method_config"),
    )
    state = checkpoint["state_dict"]
    for name, value in frozen_state_dict(method).items():
        state.setdefault(_PREFIX + name, value)


# --- export to safetensors ---------------------------------------------------------------------


def _load_lorae_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataNotFoundError(f"Checkpoint '{path}' does not exist: give the path of a .ckpt.")
    checkpoint = load_checkpoint_safely(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointReadError(f"'{path}' is not a Lightning checkpoint (no state_dict).")
    if not isinstance(checkpoint.get(ADAPTERS_KEY), Mapping):
        raise CheckpointReadError(
            f"'{path}' is not a lorae checkpoint with adapter information (no "
            f"'{ADAPTERS_KEY}' entry): export checkpoints written by `lorae fit` of this "
            "version; an older lorae checkpoint can be re-saved by resuming it with `lorae fit "
            "--ckpt_path` for one more step."
        )
    return checkpoint


def _atomic_save(tensors: dict[str, Tensor], metadata: dict[str, str], output: Path) -> None:
    """``save_file`` to a temporary name beside ``output``, flushed, then renamed over it
    (with the permissions of a file ``open`` creates: safetensors itself writes ``0600``)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        partial.touch()
        mode = partial.stat().st_mode
        save_file(tensors, partial, metadata)
        partial.chmod(mode)
        with partial.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


def export_checkpoint(ckpt_path: str | Path, output: str | Path, force: bool = False) -> Path:
    """Write the adapter tensors of a lorae checkpoint (full or adapter-only) to one
    ``.safetensors`` file.

    Tensors keep their method-relative names (``backbone.model.blocks.0.attn.qkv.A``, ...).
    Metadata (strings): ``format`` (:data:`EXPORT_FORMAT`), ``identity`` and ``method_config``
    (JSON; the config rebuilds the method given ``pretrained``), ``num_classes``,
    ``fingerprint`` of the frozen weights, ``lorae_version``.

    Raises:
        DataNotFoundError: ``ckpt_path`` does not exist.
        CheckpointReadError: not a lorae checkpoint.
        OutputExistsError: ``output`` exists and ``force`` is false.
    """
    source, target = Path(ckpt_path), Path(output)
    if target.exists() and not force:
        raise OutputExistsError(
            f"'{target}' already exists: choose another --output, or give --force to replace it."
        )
    checkpoint = _load_lorae_checkpoint(source)
    record = checkpoint[ADAPTERS_KEY]
    state = {
        name.removeprefix(_PREFIX): value
        for name, value in checkpoint["state_dict"].items()
        if name.startswith(_PREFIX)
    }
    frozen = set(record["frozen_keys"])
    fingerprint = record.get("fingerprint") or fingerprint_of(
        {name: state[name] for name in frozen}
    )
    tensors: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, value in state.items():
        if name in frozen:
            continue
        ptr = value.untyped_storage().data_ptr()  # safetensors refuses shared storage
        tensors[name] = value.contiguous() if ptr not in storages else value.clone()
        storages.add(ptr)
    metadata = {
        "format": EXPORT_FORMAT,
        "identity": json.dumps(record["identity"]),
        "method_config": json.dumps(record.get("method_config")),
        "num_classes": json.dumps(record["identity"].get("num_classes")),
        "fingerprint": fingerprint,
        "lorae_version": __version__,
    }
    _atomic_save(tensors, metadata, target)
    return target


def read_export(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a ``lorae export`` file.

    Raises:
        DataNotFoundError: the file does not exist.
        CheckpointReadError: not a safetensors file written by ``lorae export``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(
            f"Adapter file '{path}' does not exist: write one with "
            "`lorae export --ckpt_path CKPT --output FILE.safetensors`."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise CheckpointReadError(
            f"Cannot read '{path}' as a safetensors file ({error}); write it with `lorae export`."
        ) from error
    if metadata.get("format") != EXPORT_FORMAT:
        raise CheckpointReadError(
            f"'{path}' is a safetensors file but not a lorae adapter export (format "
            f"{metadata.get('format')!r}, expected {EXPORT_FORMAT!r}); write it with "
            "`lorae export`."
        )
    return tensors, metadata


def load_adapters(method: EnsembleMethod, path: str | Path) -> dict[str, str]:
    """Load a ``lorae export`` file onto a freshly built method (its backbone built from the
    same ``pretrained`` weights); returns the file's metadata.

    Raises:
        CheckpointMismatchError: the method's identity (method, members, classes, backbone,
            rank ...) or its frozen weights differ from the export's, or the tensors do not
            fit the method.
    """
    tensors, metadata = read_export(path)
    saved_identity = json.loads(metadata["identity"])
    differences = describe_mismatch(saved_identity, method.identity())
    if differences:
        raise CheckpointMismatchError(
            f"The adapters in '{path}' do not match the model they are loaded into:\n  "
            + "\n  ".join(differences)
            + "\nBuild the method with the export's settings (its method_config metadata; "
            "lorae.adapters.build_from_export does so)."
        )
    config = json.loads(metadata.get("method_config", "null"))
    _check_fingerprint(metadata["fingerprint"], frozen_fingerprint(method), f"'{path}'", config)
    result = method.load_state_dict(tensors, strict=False)
    missing = sorted(set(result.missing_keys) - set(frozen_state_dict(method)))
    if missing or result.unexpected_keys:
        raise CheckpointMismatchError(
            f"The tensors in '{path}' do not fit the model: missing {missing[:5]}, unexpected "
            f"{sorted(result.unexpected_keys)[:5]}. Export and load with the same lorae version."
        )
    return metadata


def build_from_export(path: str | Path, pretrained: Pretrained | None = None) -> EnsembleMethod:
    """Rebuild the method recorded in a ``lorae export`` file and load its adapters.

    Args:
        path: the ``.safetensors`` file.
        pretrained: the backbone's pretrained weights (``True``, a local path, or ``False``
            for a random backbone, which only the same seed rebuilds); ``None`` uses the value
            recorded at training time.

    Returns:
        the method (an :class:`~lorae.methods.EnsembleMethod`) in evaluation mode.

    Raises:
        CheckpointReadError: the export records no method config (the model was built from
            Python without ``functools.partial``); build the method yourself and call
            :func:`load_adapters`.
        CheckpointMismatchError: the pretrained weights differ from the training ones.
    """
    _, metadata = read_export(path)
    config = json.loads(metadata.get("method_config", "null"))
    if not config:
        raise CheckpointReadError(
            f"'{path}' records no method config: build the method yourself and call "
            "lorae.adapters.load_adapters(method, path)."
        )
    module_name, _, class_name = config["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, EnsembleMethod)):
        raise CheckpointReadError(f"'{config['class_path']}' is not a lorae EnsembleMethod.")
    init_args = dict(config["init_args"])
    if pretrained is not None:
        init_args["pretrained"] = pretrained
    method = cls(json.loads(metadata["num_classes"]), **init_args)
    load_adapters(method, path)
    return method.eval()
