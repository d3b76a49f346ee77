"""Fault tolerance as a cluster job meets it: SIGKILL and SIGTERM partway, then resume.

The interrupted runs are real ``python -m lorae fit`` subprocesses that receive a real signal
at a known step (:class:`tests.fixtures.fault_callbacks.SignalAtStep`); the reference is
the same config run without interruption. With ``--trainer.deterministic=true`` on the CPU the
resumed run must end with bit-identical weights and optimizer state.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lorae.cli import main
from tests.fixtures.tiny_configs import (
    TIMM_DIGITS_OVERRIDES,
    digits_lora_config,
    write_config,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Digits: 1,257 training samples, batch 32 -> 40 steps per epoch; 50 steps cross an epoch.
MAX_STEPS = 50
EVERY = 5  # checkpoint period of the interrupted runs: saves at 5, 10, ..., 45, 50


def resume_config(
    ckpt_dir: Path,
    every_n_steps: int,
    fault: dict[str, Any] | None,
    fault_class: str = "SignalAtStep",
) -> dict[str, Any]:
    """Tiny digits LoRA-Ensemble with dropout (so the random state matters) and periodic
    checkpoints (``last.ckpt`` every ``every_n_steps`` steps) into ``ckpt_dir``."""
    config = digits_lora_config(num_members=2, seed=3)
    config["data"]["init_args"]["batch_size"] = 32
    overrides = config["model"]["method"]["init_args"]["backbone_overrides"]
    overrides.update(dict(TIMM_DIGITS_OVERRIDES, proj_drop_rate=0.2, drop_rate=0.2))
    config["trainer"].update(
        {"max_steps": MAX_STEPS, "limit_val_batches": 0, "deterministic": True}
    )
    callbacks: list[dict[str, Any]] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(ckpt_dir),
                "every_n_train_steps": every_n_steps,
                "save_last": True,
            },
        }
    ]
    if fault is not None:
        callbacks.append(
            {
                "class_path": f"tests.fixtures.fault_callbacks.{fault_class}",
                "init_args": fault,
            }
        )
    config["trainer"]["callbacks"] = callbacks
    return config


def run_subprocess_fit(cfg: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorae", "fit", "--config", str(cfg), *extra],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), f"weights differ: {key}"
    states_a = a["optimizer_states"][0]["state"]
    states_b = b["optimizer_states"][0]["state"]
    assert states_a.keys() == states_b.keys()
    for index, state in states_a.items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(states_b[index][name])), (
                f"optimizer state {index}.{name} differs"
            )
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run (in this process), its final ``last.ckpt``."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp / "config.yaml", resume_config(tmp / "ckpt", MAX_STEPS, None))
    run_in_process(["fit", "--config", str(cfg), f"--trainer.default_root_dir={tmp / 'run'}"])
    return load(tmp / "ckpt" / "last.ckpt")


def run_in_process(args: list[str]) -> None:
    old_argv = sys.argv
    sys.argv = ["lorae"]
    try:
        main(args)
    finally:
        sys.argv = old_argv


@pytest.mark.parametrize("crash_step", [17, 47], ids=["mid-epoch-0", "mid-epoch-1"])
def test_crash_then_resume_is_bit_identical(
    crash_step: int, reference: dict[str, Any], tmp_path: Path
) -> None:
    """In-process (fast) version of the SIGKILL test: an exception ends the run."""
    ckpt_dir = tmp_path / "ckpt"
    fault = {"step": crash_step}
    cfg = write_config(
        tmp_path / "crash.yaml", resume_config(ckpt_dir, EVERY, fault, "RaiseAtStep")
    )
    root = f"--trainer.default_root_dir={tmp_path / 'run'}"
    with pytest.raises(RuntimeError, match="deliberate crash"):
        run_in_process(["fit", "--config", str(cfg), root])
    assert load(ckpt_dir / "last.ckpt")["global_step"] == crash_step // EVERY * EVERY
    cfg = write_config(tmp_path / "resume.yaml", resume_config(ckpt_dir, EVERY, None))
    run_in_process(["fit", "--config", str(cfg), root, "--ckpt_path", "last"])
    assert_same_training_state(load(ckpt_dir / "last.ckpt"), reference)


@pytest.mark.slow
@pytest.mark.parametrize("kill_step", [17, 47], ids=["mid-epoch-0", "mid-epoch-1"])
def test_sigkill_then_resume_is_bit_identical(
    kill_step: int, reference: dict[str, Any], tmp_path: Path
) -> None:
    ckpt_dir = tmp_path / "ckpt"
    fault = {"step": kill_step, "signal_name": "SIGKILL"}
    killed_cfg = write_config(tmp_path / "killed.yaml", resume_config(ckpt_dir, EVERY, fault))
    killed = run_subprocess_fit(killed_cfg, f"--trainer.default_root_dir={tmp_path / 'run'}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # Periodic checkpoints: the newest one is from before the kill, mid-epoch.
    partial = load(ckpt_dir / "last.ckpt")
    assert partial["global_step"] == kill_step // EVERY * EVERY

    resumed_cfg = write_config(tmp_path / "resumed.yaml", resume_config(ckpt_dir, EVERY, None))
    resumed = run_subprocess_fit(
        resumed_cfg, f"--trainer.default_root_dir={tmp_path / 'run'}", "--ckpt_path", "last"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training_state(load(ckpt_dir / "last.ckpt"), reference)


@pytest.mark.slow
def test_sigterm_writes_last_checkpoint_and_resumes(
    reference: dict[str, Any], tmp_path: Path
) -> None:
    ckpt_dir = tmp_path / "ckpt"
    # The first periodic checkpoint is due at step 25: only the SIGTERM handler can write one
    # at step 23.
    fault = {"step": 23, "signal_name": "SIGTERM"}
    cfg = write_config(tmp_path / "term.yaml", resume_config(ckpt_dir, 25, fault))
    terminated = run_subprocess_fit(cfg, f"--trainer.default_root_dir={tmp_path / 'run'}")
    assert terminated.returncode == 128 + signal.SIGTERM, terminated.stderr[-3000:]
    assert "Received SIGTERM: saved" in terminated.stderr + terminated.stdout
    saved = load(ckpt_dir / "last.ckpt")
    assert saved["global_step"] == 23

    cfg = write_config(tmp_path / "resume.yaml", resume_config(ckpt_dir, 25, None))
    resumed = run_subprocess_fit(
        cfg, f"--trainer.default_root_dir={tmp_path / 'run'}", "--ckpt_path", "last"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training_state(load(ckpt_dir / "last.ckpt"), reference)


def snapshot_config(ckpt_dir: Path, fault: dict[str, Any] | None) -> dict[str, Any]:
    """Snapshot Ensemble, 3 members over 3 epochs of 20 steps: snapshots at steps 20, 40, 60;
    checkpoints every 10 steps."""
    config = resume_config(ckpt_dir, 10, fault, "RaiseAtStep")
    lora = config["model"]["method"]["init_args"]
    config["model"]["method"] = {
        "class_path": "lorae.methods.SnapshotEnsemble",
        "init_args": {
            "backbone": lora["backbone"],
            "pretrained": False,
            "backbone_overrides": lora["backbone_overrides"],
            "num_members": 3,
            "burn_in_epochs": 1,
            "lora": {"rank": 2, "gain": 1.0},
        },
    }
    config["trainer"].update({"max_steps": -1, "max_epochs": 3, "limit_train_batches": 20})
    return config


def test_snapshot_ensemble_resumes_bit_identical(tmp_path: Path) -> None:
    """The snapshots taken so far, the cyclic schedule's position and the data order survive
    a crash in the middle of the second cycle."""
    root = f"--trainer.default_root_dir={tmp_path / 'run'}"
    reference_cfg = write_config(tmp_path / "ref.yaml", snapshot_config(tmp_path / "ref", None))
    run_in_process(
        ["fit", "--config", str(reference_cfg), f"--trainer.default_root_dir={tmp_path}"]
    )
    reference = load(tmp_path / "ref" / "last.ckpt")
    assert int(reference["state_dict"]["method.num_snapshots"]) == 3

    ckpt_dir = tmp_path / "ckpt"
    crash_cfg = write_config(tmp_path / "crash.yaml", snapshot_config(ckpt_dir, {"step": 53}))
    with pytest.raises(RuntimeError, match="deliberate crash"):
        run_in_process(["fit", "--config", str(crash_cfg), root])
    partial = load(ckpt_dir / "last.ckpt")
    assert partial["global_step"] == 50
    assert int(partial["state_dict"]["method.num_snapshots"]) == 2
    resume_cfg = write_config(tmp_path / "resume.yaml", snapshot_config(ckpt_dir, None))
    run_in_process(["fit", "--config", str(resume_cfg), root, "--ckpt_path", "last"])
    resumed = load(ckpt_dir / "last.ckpt")
    assert resumed["global_step"] == reference["global_step"] == 60
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), f"differs: {key}"
