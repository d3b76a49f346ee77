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
- The ``.safetensors`` export of ``lorae export`` is :mod:`lorae.checkpoints.export`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lorae.errors import CheckpointMismatchError
from lorae.methods.base import EnsembleMethod

__all__ = [
    "ADAPTERS_KEY",
    "CheckpointContents",
    "adapter_state_dict",
    "check_fingerprint",
    "checkpoint_record",
    "fingerprint_of",
    "frozen_fingerprint",
    "frozen_state_dict",
    "is_adapter_checkpoint",
    "method_config",
    "record_prefix",
    "restore_checkpoint",
    "strip_checkpoint",
    "tensor_bytes",
]

#: Checkpoint entry with what lorae needs to separate adapters from the frozen backbone.
ADAPTERS_KEY = "lorae_adapters"
#: What a Lightning checkpoint stores: every weight, or only the adapters.
CheckpointContents = Literal["full", "adapters"]


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
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)  # e.g. a LoRASpec: rebuilt from its type hint
        raise TypeError(type(value).__name__)

    try:
        init_args = json.loads(json.dumps(dict(factory.keywords), default=plain))
    except (TypeError, ValueError):
        return None
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


# --- adapter-only Lightning checkpoints --------------------------------------------------------


def checkpoint_record(
    method: EnsembleMethod,
    contents: CheckpointContents,
    config: dict[str, Any] | None,
    prefix: str,
) -> dict[str, Any]:
    """The :data:`ADAPTERS_KEY` entry of a checkpoint (plain data, loads with
    ``weights_only=True``): ``contents``, the ``prefix`` of the method's entries in the
    checkpoint's ``state_dict`` (the LightningModule's attribute name and a dot), the
    method-relative names of the frozen tensors, the method's identity and config, and (for
    ``"adapters"``) the frozen fingerprint."""
    record: dict[str, Any] = {
        "contents": contents,
        "prefix": prefix,
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
        state.pop(record["prefix"] + name, None)


def is_adapter_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a loaded Lightning checkpoint holds only adapters (needs the pretrained
    weights to be loaded)."""
    record = checkpoint.get(ADAPTERS_KEY)
    return isinstance(record, Mapping) and record.get("contents") == "adapters"


def record_prefix(record: Mapping[str, Any]) -> str:
    """The ``state_dict`` prefix of the method's entries (``"method."`` in checkpoints written
    before the prefix was recorded)."""
    return str(record.get("prefix", "method."))


def _pretrained_hint(config: Mapping[str, Any] | None) -> str:
    """Where to set ``pretrained`` and, when recorded, the value the adapters were trained on."""
    if not config or "pretrained" not in config.get("init_args", {}):
        return "Set the method's `pretrained` to the weights the adapters were trained on."
    value = config["init_args"]["pretrained"]
    if value is False:
        return (
            "They were trained on a randomly initialised backbone (the method's `pretrained`: "
            "false), which only the same config and seed_everything rebuild."
        )
    return (
        f"They were trained with the method's `pretrained`: {json.dumps(value)}; set it to "
        "those weights."
    )


def check_fingerprint(saved: str, current: str, source: str, config: Any) -> None:
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
    check_fingerprint(
        record["fingerprint"],
        frozen_fingerprint(method),
        "The checkpoint",
        record.get("method_config"),
    )
    state = checkpoint["state_dict"]
    for name, value in frozen_state_dict(method).items():
        state.setdefault(record_prefix(record) + name, value)
