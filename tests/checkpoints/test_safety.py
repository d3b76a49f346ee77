"""Checkpoints are data, not code; checkpoint writes are atomic; random states round-trip."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lorae.checkpoints import safe as checkpointing
from lorae.checkpoints.safe import SafeCheckpointIO, load_checkpoint_safely
from lorae.cli import main
from lorae.errors import CheckpointReadError, UnsafeCheckpointError
from lorae.training import RandomStateCheckpoint
from tests.fixtures.tiny_configs import digits_lora_config, write_config

LORAE_SOURCE = Path(__file__).resolve().parents[2] / "lorae"


class _RunsCode:
    """Unpickling this calls ``os.system``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def hostile_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint-shaped file whose unpickling would create ``marker``."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, path)
    return path, marker


def test_hostile_checkpoint_really_runs_code_when_unpickled(
    hostile_checkpoint: tuple[Path, Path],
) -> None:
    """Control: the fixture is dangerous, so the refusals below mean something."""
    path, marker = hostile_checkpoint
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_safe_loader_refuses_hostile_checkpoint(hostile_checkpoint: tuple[Path, Path]) -> None:
    path, marker = hostile_checkpoint
    with pytest.raises(UnsafeCheckpointError, match="Refusing to load") as info:
        load_checkpoint_safely(path)
    assert "posix.system" in str(info.value) or "os.system" in str(info.value)
    with pytest.raises(UnsafeCheckpointError):
        SafeCheckpointIO().load_checkpoint(path, weights_only=False)  # the caller cannot opt out
    assert not marker.exists()


def test_cli_refuses_hostile_checkpoint(
    hostile_checkpoint: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, marker = hostile_checkpoint
    cfg = write_config(tmp_path / "config.yaml", digits_lora_config())
    for subcommand in ("fit", "test"):
        with pytest.raises(SystemExit) as exit_info:
            main([subcommand, "--config", str(cfg), "--ckpt_path", str(path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"lorae: error: Refusing to load '{path}'" in err
        assert "Traceback" not in err
    assert not marker.exists()


def test_truncated_checkpoint_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.randn(100)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointReadError, match="truncated or not a PyTorch checkpoint"):
        SafeCheckpointIO().load_checkpoint(path)


def test_lightning_checkpoint_loads_as_data(tmp_path: Path) -> None:
    path = tmp_path / "ok.ckpt"
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 2}, path)
    loaded = SafeCheckpointIO().load_checkpoint(path)
    assert loaded["epoch"] == 2 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))


def test_interrupted_write_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    io = SafeCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(4)}, path)

    def crash_midway(obj: object, handle: object) -> None:
        handle.write(b"PK\x03\x04 half a zip file")  # type: ignore[attr-defined]
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpointing.torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert load_checkpoint_safely(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left


def test_partial_file_name_is_never_a_last_checkpoint(tmp_path: Path) -> None:
    """Lightning's ``--ckpt_path last`` matches ``last*.ckpt``; a leftover partial file (from
    a SIGKILL mid-write) must not match."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    name = Path(f".last.ckpt.partial-{os.getpid()}")
    pattern = rf"^{ModelCheckpoint.CHECKPOINT_NAME_LAST}(-(\d+))?"
    assert not (name.suffix == ".ckpt" and re.match(pattern, name.stem))


def test_random_states_round_trip_through_a_safe_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    callback = RandomStateCheckpoint()
    path = tmp_path / "rng.ckpt"
    SafeCheckpointIO().save_checkpoint({"callbacks": callback.state_dict()}, path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restored = RandomStateCheckpoint()
    restored.load_state_dict(SafeCheckpointIO().load_checkpoint(path)["callbacks"])
    restored.on_train_start(None, None)  # type: ignore[arg-type]  # trainer unused
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_lorae_source_loads_torch_files_only_as_data() -> None:
    """Every ``torch.load`` in lorae passes ``weights_only=True``; no numpy pickles."""
    offenders = []
    for path in LORAE_SOURCE.rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in match.group(0):
                offenders.append(f"{path}: {match.group(0)}")
        if "allow_pickle=True" in text:
            offenders.append(f"{path}: allow_pickle=True")
    assert not offenders, offenders


def test_offline_run_never_opens_a_network_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fit + test + predict with local data and ``pretrained: false`` reach no network."""
    import socket

    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    cfg = write_config(tmp_path / "config.yaml", digits_lora_config())
    for subcommand in ("fit", "test", "predict"):
        main(
            [
                subcommand,
                "--config",
                str(cfg),
                "--trainer.fast_dev_run=true",
                f"--trainer.default_root_dir={tmp_path / subcommand}",
            ]
        )
    assert attempts == []
