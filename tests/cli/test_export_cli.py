"""Adapter-only checkpoints and ``lorae export`` through the ``lorae`` command.

A tiny timm ViT on the digits whose "pretrained" weights are a local file (as on a machine
without internet): trained once with full checkpoints, once with ``model.checkpoint:
adapters``, each for 2 steps and then resumed from its checkpoint to 4. Everything the
adapter-only run produces must equal the full run bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from lorae.backbones import create_backbone
from lorae.checkpoints.adapters import ADAPTERS_KEY
from lorae.checkpoints.export import build_from_export, read_export
from lorae.cli import main
from lorae.lora import LoRASpec
from lorae.methods import LoRAEnsemble
from tests.cli.test_cli import read_metrics
from tests.fixtures.tiny_configs import (
    DIGITS_NUM_CLASSES,
    TIMM_DIGITS_OVERRIDES,
    checkpoint_callback,
    digits_lora_config,
    write_config,
)

NAME = "vit_tiny_patch16_224"


def _weights(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    model = create_backbone(NAME, False, TIMM_DIGITS_OVERRIDES).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _config(root: Path, name: str, pretrained: str, contents: str) -> Path:
    config = digits_lora_config(num_members=2)
    config["model"]["method"]["init_args"]["pretrained"] = pretrained
    config["model"]["checkpoint"] = contents
    config["trainer"]["callbacks"] = [checkpoint_callback(root / name / "ckpt")]
    config["trainer"].update(limit_val_batches=1, limit_test_batches=2)
    return write_config(root / f"{name}.yaml", config)


def _fit(config: Path, root: Path, steps: int, *extra: str) -> None:
    main(
        [
            "fit",
            "--config",
            str(config),
            f"--trainer.default_root_dir={root}",
            f"--trainer.max_steps={steps}",
            *extra,
        ]
    )


def _test(config: Path, ckpt: Path, root: Path, *extra: str) -> dict[str, Any]:
    main(
        [
            "test",
            "--config",
            str(config),
            "--seed_everything=123",
            "--ckpt_path",
            str(ckpt),
            f"--trainer.default_root_dir={root}",
            *extra,
        ]
    )
    return read_metrics(root / "metrics.json")


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class Runs:
    root: Path
    weights: str
    other_weights: str
    full_config: Path
    adapters_config: Path
    full_ckpt: Path
    adapters_ckpt: Path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """The same training with full and with adapter-only checkpoints: 2 steps, then resumed
    from the checkpoint to 4."""
    root = tmp_path_factory.mktemp("export")
    weights = _weights(root / "a.safetensors", 1)
    other = _weights(root / "b.safetensors", 2)
    configs, lasts = {}, {}
    for contents in ("full", "adapters"):
        configs[contents] = _config(root, contents, weights, contents)
        _fit(configs[contents], root / contents, 2)
        lasts[contents] = root / contents / "ckpt" / "last.ckpt"
        assert _load(lasts[contents])["global_step"] == 2
        _fit(configs[contents], root / contents, 4, "--ckpt_path", str(lasts[contents]))
    return Runs(
        root, weights, other, configs["full"], configs["adapters"], lasts["full"], lasts["adapters"]
    )


def test_adapter_checkpoint_holds_only_adapters_and_resumes_bit_identically(runs: Runs) -> None:
    full, small = _load(runs.full_ckpt), _load(runs.adapters_ckpt)
    assert small["global_step"] == full["global_step"] == 4
    frozen = {"method." + k for k in full[ADAPTERS_KEY]["frozen_keys"]}
    assert frozen and set(small["state_dict"]) == set(full["state_dict"]) - frozen
    for key, value in small["state_dict"].items():  # the resumed run trained identically
        assert torch.equal(value, full["state_dict"][key]), key
    assert small[ADAPTERS_KEY]["contents"] == "adapters"
    assert runs.adapters_ckpt.stat().st_size < runs.full_ckpt.stat().st_size


def test_lorae_test_on_adapter_checkpoint_gives_the_same_metrics(runs: Runs) -> None:
    """`lorae test` loads the configured pretrained file for an adapter-only checkpoint
    (not the random backbone it builds for a full one) and matches the full checkpoint."""
    full = _test(runs.full_config, runs.full_ckpt, runs.root / "test_full")
    small = _test(runs.adapters_config, runs.adapters_ckpt, runs.root / "test_adapters")
    assert small["metrics"] == full["metrics"]
    assert small["metrics"]["test/acc"] > 0


def test_lorae_test_with_other_pretrained_weights_fails_clearly(
    runs: Runs, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _test(
            runs.adapters_config,
            runs.adapters_ckpt,
            runs.root / "test_other",
            f"--model.method.init_args.pretrained={runs.other_weights}",
        )
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "lorae: error: The checkpoint holds only adapters" in message
    assert "different pretrained weights" in message and runs.weights in message


def test_export_then_build_gives_identical_logits(
    runs: Runs, capsys: pytest.CaptureFixture[str]
) -> None:
    out = runs.root / "exported" / "adapters.safetensors"
    main(["export", "--ckpt_path", str(runs.adapters_ckpt), "--output", str(out)])
    assert "Wrote" in capsys.readouterr().out
    tensors, metadata = read_export(out)
    assert metadata["lorae_version"] and len(metadata["fingerprint"]) == 64

    reference = LoRAEnsemble(
        DIGITS_NUM_CLASSES,
        NAME,
        num_members=2,
        lora=LoRASpec(rank=2, gain=1.0),
        pretrained=runs.weights,
        backbone_overrides=TIMM_DIGITS_OVERRIDES,
    )
    state = _load(runs.full_ckpt)["state_dict"]
    reference.load_state_dict({k.removeprefix("method."): v for k, v in state.items()})
    rebuilt = build_from_export(out)  # method config and pretrained path from the metadata
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), reference.eval()(x))

    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(runs.full_ckpt), "--output", str(out)])
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err
    main(["export", "--ckpt_path", str(runs.full_ckpt), "--output", str(out), "--force"])
    again, _ = read_export(out)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in again)


def test_analyze_reads_an_adapter_checkpoint_like_a_full_one(runs: Runs) -> None:
    """`lorae analyze` keeps the configured pretrained weights for an adapter-only checkpoint
    (a full one holds every weight) and reports the same member accuracies."""
    reports = {}
    for name, config, ckpt in (
        ("full", runs.full_config, runs.full_ckpt),
        ("adapters", runs.adapters_config, runs.adapters_ckpt),
    ):
        out = runs.root / f"analyze_{name}"
        code = main(
            ["analyze", "--config", str(config), "--ckpt_path", str(ckpt), "--output_dir", str(out)]
        )
        assert code in (None, 0)
        reports[name] = json.loads((out / "analysis.json").read_text())
    assert reports["adapters"]["member_accuracy"] == reports["full"]["member_accuracy"]
