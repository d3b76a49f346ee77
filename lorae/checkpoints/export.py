"""``lorae export``'s file format: the adapters of a checkpoint as one ``.safetensors`` file.

:func:`export_checkpoint` writes the adapter tensors of a lorae checkpoint (full or
adapter-only, :mod:`lorae.checkpoints.adapters`) with the method's identity, config and the
fingerprint of the frozen backbone; :func:`read_export` reads one; :func:`load_adapters` and
:func:`build_from_export` put it onto a freshly built backbone (paper section 3: the frozen
pretrained weights are shared and rebuilt, only what the members add is stored).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from lorae import __version__
from lorae.backbones.base import Pretrained
from lorae.checkpoints.adapters import (
    ADAPTERS_KEY,
    check_fingerprint,
    fingerprint_of,
    frozen_fingerprint,
    frozen_state_dict,
    record_prefix,
)
from lorae.checkpoints.atomic import atomic_path
from lorae.checkpoints.safe import load_checkpoint_safely
from lorae.errors import (
    CheckpointMismatchError,
    CheckpointReadError,
    DataNotFoundError,
    OutputExistsError,
)
from lorae.methods.base import EnsembleMethod, describe_mismatch

__all__ = [
    "EXPORT_FORMAT",
    "OutputExistsError",
    "build_from_export",
    "export_checkpoint",
    "load_adapters",
    "read_export",
]

#: ``format`` metadata value of an export file.
EXPORT_FORMAT = "lorae-adapters/1"


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


def _save(tensors: dict[str, Tensor], metadata: dict[str, str], output: Path) -> None:
    """``save_file`` atomically (:func:`~lorae.checkpoints.atomic.atomic_path`), with the
    permissions of a file ``open`` creates (safetensors itself writes ``0600``)."""
    with atomic_path(output) as partial:
        partial.touch()
        mode = partial.stat().st_mode
        save_file(tensors, partial, metadata)
        partial.chmod(mode)


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
    prefix = record_prefix(record)
    state = {
        name.removeprefix(prefix): value
        for name, value in checkpoint["state_dict"].items()
        if name.startswith(prefix)
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
    _save(tensors, metadata, target)
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
            "lorae.checkpoints.adapters.build_from_export does so)."
        )
    config = json.loads(metadata.get("method_config", "null"))
    check_fingerprint(metadata["fingerprint"], frozen_fingerprint(method), f"'{path}'", config)
    result = method.load_state_dict(tensors, strict=False)
    missing = sorted(set(result.missing_keys) - set(frozen_state_dict(method)))
    if missing or result.unexpected_keys:
        raise CheckpointMismatchError(
            f"The tensors in '{path}' do not fit the model: missing {missing[:5]}, unexpected "
            f"{sorted(result.unexpected_keys)[:5]}. Export and load with the same lorae version."
        )
    return metadata


def _typed_arguments(cls: type[EnsembleMethod], init_args: Mapping[str, Any]) -> dict[str, Any]:
    """``init_args`` read back from JSON, with every mapping given to a dataclass-typed
    parameter (``lora: LoRASpec``) turned into that dataclass again."""
    hints = typing.get_type_hints(cls.__init__)
    typed = dict(init_args)
    for name, value in init_args.items():
        if not isinstance(value, Mapping):
            continue
        hint = hints.get(name)
        candidates = [hint, *typing.get_args(hint)]  # LoRASpec, or LoRASpec | None
        spec = next((c for c in candidates if dataclasses.is_dataclass(c)), None)
        if isinstance(spec, type):
            typed[name] = spec(**value)
    return typed


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
            "lorae.checkpoints.adapters.load_adapters(method, path)."
        )
    module_name, _, class_name = config["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, EnsembleMethod)):
        raise CheckpointReadError(f"'{config['class_path']}' is not a lorae EnsembleMethod.")
    init_args = _typed_arguments(cls, config["init_args"])
    if pretrained is not None:
        init_args["pretrained"] = pretrained
    method = cls(json.loads(metadata["num_classes"]), **init_args)
    load_adapters(method, path)
    return method.eval()
