"""Adapter-only state (issue 6, "Memory"): selection, fingerprint, adapter-only checkpoints,
``safetensors`` export and loading onto a freshly built backbone."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from lorae.backbones import create_backbone
from lorae.checkpoints import export
from lorae.checkpoints.adapters import (
    ADAPTERS_KEY,
    adapter_state_dict,
    frozen_fingerprint,
    frozen_state_dict,
)
from lorae.checkpoints.export import (
    OutputExistsError,
    build_from_export,
    export_checkpoint,
    load_adapters,
    read_export,
)
from lorae.errors import CheckpointMismatchError, CheckpointReadError, DataNotFoundError
from lorae.lora import LoRASpec
from lorae.methods import BayesLoRA, EnsembleMethod, LoRAEnsemble, SnapshotEnsemble
from lorae.module import EnsembleClassifier
from tests.fixtures.models import TINY_BACKBONES, tiny_inputs

C = 3
NAME, OVERRIDES = TINY_BACKBONES["timm_vit"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two different 'pretrained' weight files of the tiny timm ViT."""
    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for key, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        model = create_backbone(NAME, False, OVERRIDES).model
        path = folder / f"{key}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        paths[key] = str(path)
    return paths


TINY_LORA = LoRASpec(rank=2)


def _factory(kind: str, pretrained: Any, **options: Any) -> Callable[[int], EnsembleMethod]:
    common = {"backbone": NAME, "pretrained": pretrained, "backbone_overrides": OVERRIDES}
    if kind == "lora":
        return functools.partial(LoRAEnsemble, num_members=3, lora=TINY_LORA, **common, **options)
    if kind == "snapshot":
        return functools.partial(
            SnapshotEnsemble, num_members=3, lora=TINY_LORA, **common, **options
        )
    return functools.partial(
        BayesLoRA, num_members=3, lora=TINY_LORA, fit_batches=1, **common, **options
    )


def _trained(kind: str, pretrained: Any, seed: int = 0, **options: Any) -> EnsembleClassifier:
    """A module whose adapters (and buffers) differ from a fresh build: random trainable
    values, snapshots taken, a posterior fitted."""
    torch.manual_seed(seed)
    module = EnsembleClassifier(_factory(kind, pretrained, **options), C)
    method = module.method
    with torch.no_grad():
        for param in method.parameters():
            if param.requires_grad:
                param.normal_(0, 0.3)
    if isinstance(method, SnapshotEnsemble):
        for _ in range(3):  # all 3 snapshots (evaluation needs M), each of other weights
            method.take_snapshot()
            for param in method.parameters():
                if param.requires_grad:
                    param.data.normal_(0, 0.3)
    if isinstance(method, BayesLoRA):
        x = tiny_inputs("timm_vit", 4, seed=5)
        method.fit_posterior([(x, torch.tensor([0, 1, 2, 0]))])
    return module.eval()


def _logits(method: torch.nn.Module) -> Tensor:
    with torch.no_grad():
        return method.eval()(tiny_inputs("timm_vit", 2))


@pytest.mark.parametrize("kind", ["lora", "snapshot", "bayes"])
def test_adapter_state_dict_is_trainable_parameters_and_buffers(kind: str) -> None:
    method = _trained(kind, False).method
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in method.named_buffers()}
    frozen = {n for n, p in method.named_parameters() if not p.requires_grad}
    selected = adapter_state_dict(method)
    assert set(selected) == trainable | buffers
    assert frozen and not frozen & set(selected)
    assert set(frozen_state_dict(method)) == frozen
    state = method.state_dict()
    assert all(torch.equal(selected[k], state[k]) for k in selected)
    prefix = {"lora": "head.", "snapshot": "snapshots.", "bayes": "posterior."}[kind]
    assert any(k.startswith(prefix) for k in selected)


def test_adapter_state_dict_keeps_trained_backbone_parts() -> None:
    method = _trained("lora", False, train_backbone="embedding").method
    selected = adapter_state_dict(method)
    assert any("patch_embed" in k for k in selected), "a trainable embedding is an adapter"
    assert not any("attn.qkv.base" in k or "attn.qkv.weight" in k for k in selected)


def test_fingerprint_identifies_the_frozen_weights(weights: dict[str, str]) -> None:
    first = _trained("lora", weights["a"], seed=0).method
    again = _trained("lora", weights["a"], seed=7).method  # other adapters, same backbone
    other = _trained("lora", weights["b"], seed=0).method
    assert frozen_fingerprint(first) == frozen_fingerprint(again)
    assert frozen_fingerprint(first) != frozen_fingerprint(other)
    name, value = next(iter(frozen_state_dict(again).items()))
    with torch.no_grad():
        value.view(-1)[0] += 1e-6
    assert frozen_fingerprint(first) != frozen_fingerprint(again), f"{name} changed"
    assert frozen_fingerprint(first) != frozen_fingerprint(first.double())


@pytest.mark.parametrize("kind", ["lora", "snapshot", "bayes"])
def test_adapter_checkpoint_round_trip_is_bit_identical(kind: str, weights: dict[str, str]) -> None:
    """Save adapters only; a fresh module (other random adapters, same pretrained file)
    loads it strictly and computes the very same logits."""
    trained = _trained(kind, weights["a"], seed=0)
    trained.checkpoint_contents = "adapters"
    checkpoint: dict[str, Any] = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    kept = {k.removeprefix("method.") for k in checkpoint["state_dict"]}
    assert kept == set(adapter_state_dict(trained.method))
    fresh = _trained(kind, weights["a"], seed=3)
    assert not torch.equal(_logits(fresh.method), _logits(trained.method))
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    assert torch.equal(_logits(fresh.method), _logits(trained.method))


def test_full_checkpoint_keeps_everything_and_records_frozen_keys() -> None:
    module = _trained("lora", False)
    checkpoint: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(module.state_dict())
    record = checkpoint[ADAPTERS_KEY]
    assert record["contents"] == "full" and "fingerprint" not in record
    assert set(record["frozen_keys"]) == set(frozen_state_dict(module.method))
    assert record["method_config"]["class_path"] == "lorae.methods.lora_ensemble.LoRAEnsemble"
    assert record["method_config"]["init_args"]["num_members"] == 3


def test_adapter_checkpoint_on_other_weights_names_pretrained(weights: dict[str, str]) -> None:
    trained = _trained("lora", weights["a"])
    trained.checkpoint_contents = "adapters"
    checkpoint: dict[str, Any] = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    other = _trained("lora", weights["b"])
    with pytest.raises(CheckpointMismatchError) as error:
        other.on_load_checkpoint(checkpoint)
    message = str(error.value)
    assert "different pretrained weights" in message
    assert "the method's `pretrained`" in message and weights["a"] in message


def _save_checkpoint(module: EnsembleClassifier, path: Path, contents: str) -> Path:
    module.checkpoint_contents = contents  # type: ignore[assignment]
    checkpoint: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("kind", ["lora", "snapshot", "bayes"])
def test_export_then_load_onto_a_fresh_backbone(
    kind: str, weights: dict[str, str], tmp_path: Path
) -> None:
    trained = _trained(kind, weights["a"])
    ckpt = _save_checkpoint(trained, tmp_path / "full.ckpt", "full")
    out = export_checkpoint(ckpt, tmp_path / "adapters.safetensors")
    tensors, metadata = read_export(out)
    assert set(tensors) == set(adapter_state_dict(trained.method))
    assert json.loads(metadata["identity"]) == trained.method.identity()
    assert metadata["fingerprint"] == frozen_fingerprint(trained.method)
    fresh = _trained(kind, weights["a"], seed=4).method
    load_adapters(fresh, out)
    assert torch.equal(_logits(fresh), _logits(trained.method))
    rebuilt = build_from_export(out)  # the recorded config and pretrained file
    assert torch.equal(_logits(rebuilt), _logits(trained.method))


def test_export_of_full_and_adapter_checkpoints_agree(
    weights: dict[str, str], tmp_path: Path
) -> None:
    trained = _trained("lora", weights["a"])
    full = export_checkpoint(
        _save_checkpoint(trained, tmp_path / "full.ckpt", "full"), tmp_path / "f.safetensors"
    )
    small = export_checkpoint(
        _save_checkpoint(trained, tmp_path / "ad.ckpt", "adapters"), tmp_path / "a.safetensors"
    )
    (ft, fm), (at, am) = read_export(full), read_export(small)
    assert fm == am
    assert ft.keys() == at.keys() and all(torch.equal(ft[k], at[k]) for k in ft)
    stored = torch.load(tmp_path / "ad.ckpt", weights_only=True)["state_dict"]
    assert {k.removeprefix("method.") for k in stored} == set(at)


def test_load_adapters_refuses_other_weights_and_other_settings(
    weights: dict[str, str], tmp_path: Path
) -> None:
    trained = _trained("lora", weights["a"])
    out = export_checkpoint(
        _save_checkpoint(trained, tmp_path / "c.ckpt", "adapters"), tmp_path / "x.safetensors"
    )
    with pytest.raises(CheckpointMismatchError, match="different pretrained weights"):
        load_adapters(_trained("lora", weights["b"]).method, out)
    wrong_size = LoRAEnsemble(
        C, NAME, 2, TINY_LORA, pretrained=weights["a"], backbone_overrides=OVERRIDES
    )
    with pytest.raises(CheckpointMismatchError, match="num_members: checkpoint 3, config 2"):
        load_adapters(wrong_size, out)
    with pytest.raises(CheckpointMismatchError, match="different pretrained weights"):
        build_from_export(out, pretrained=weights["b"])


def test_export_refuses_to_overwrite_and_writes_atomically(
    weights: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = _save_checkpoint(_trained("lora", weights["a"]), tmp_path / "c.ckpt", "adapters")
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        export_checkpoint(ckpt, out)
    assert out.read_bytes() == b"keep me"

    def broken(*args: Any) -> None:
        Path(args[1]).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(ckpt, out, force=True)
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt", "x.safetensors"]
    monkeypatch.undo()
    export_checkpoint(ckpt, out, force=True)
    assert read_export(out)[1]["format"] == export.EXPORT_FORMAT


def test_export_and_read_errors(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="does not exist"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "x.safetensors")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointReadError, match="not a lorae checkpoint"):
        export_checkpoint(foreign, tmp_path / "x.safetensors")
    with pytest.raises(DataNotFoundError, match="lorae export"):
        read_export(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointReadError, match="not a lorae adapter export"):
        read_export(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointReadError, match="Cannot read"):
        read_export(garbage)
