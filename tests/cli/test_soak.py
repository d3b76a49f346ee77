"""Soak: a 2-process DDP fit killed with SIGKILL at 10 random moments, resumed each time with
``--ckpt_path last``, ends with the weights of an uninterrupted run (issue 19).

Each run is killed at a random moment after it has written its first periodic checkpoint, so
every kill lands in training: in a step, between steps, or while a checkpoint is being written
(checkpoints go through :mod:`lorae.checkpoints.atomic`, so the previous ``last.ckpt``
survives), and every run makes progress. The delays come from a seeded generator; where in a
step each kill lands depends on the machine's speed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.tiny_configs import digits_lora_config, write_config

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 800
EVERY = 5
KILLS = 10


def soak_config(ckpt_dir: Path) -> dict[str, Any]:
    """Tiny digits LoRA-Ensemble on 2 DDP processes, ``last.ckpt`` every EVERY steps."""
    config = digits_lora_config(num_members=2, seed=5)
    config["data"]["init_args"]["batch_size"] = 8
    config["trainer"].update(
        {
            "strategy": "ddp",
            "devices": 2,
            "max_steps": MAX_STEPS,
            "limit_val_batches": 0,
            "deterministic": True,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(ckpt_dir),
                        "every_n_train_steps": EVERY,
                        "save_last": True,
                    },
                }
            ],
        }
    )
    return config


def _fit(cfg: Path, root: Path, resume: bool) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "lorae", "fit", "--config", str(cfg)]
    args += [f"--trainer.default_root_dir={root}"]
    if resume:
        args += ["--ckpt_path", "last"]
    with (root / "stderr.log").open("ab") as log:  # a file: a full pipe would stall the run
        return subprocess.Popen(  # its own session: the kill reaches both DDP processes
            args, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
        )


def _log_tail(root: Path) -> str:
    return (root / "stderr.log").read_text(errors="replace")[-4000:]


def _run_to_end(cfg: Path, root: Path, resume: bool) -> None:
    process = _fit(cfg, root, resume)
    assert process.wait(timeout=600) == 0, _log_tail(root)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == MAX_STEPS
    state: dict[str, torch.Tensor] = checkpoint["state_dict"]
    return state


def test_ten_sigkills_then_resume_end_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference_cfg = write_config(reference / "in.yaml", soak_config(reference / "ckpt"))
    _run_to_end(reference_cfg, reference, resume=False)
    expected = _weights(reference / "ckpt" / "last.ckpt")

    soak = tmp_path / "soak"
    cfg = write_config(soak / "in.yaml", soak_config(soak / "ckpt"))
    delays = random.Random(19)
    last = soak / "ckpt" / "last.ckpt"
    kills = 0
    while kills < KILLS:
        started = time.time()
        process = _fit(cfg, soak, resume=kills > 0)
        while process.poll() is None and not (last.exists() and last.stat().st_mtime > started):
            time.sleep(0.05)  # until this run has trained and saved at least once
        if process.poll() is not None:
            assert process.returncode == 0, _log_tail(soak)
            break  # it finished: nothing left to kill
        time.sleep(delays.uniform(0.0, 1.5))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        kills += 1
        time.sleep(0.5)  # let the killed processes' sockets close
    _run_to_end(cfg, soak, resume=True)
    assert kills == KILLS, f"only {kills} kills landed: the runs finished too early"
    got = _weights(soak / "ckpt" / "last.ckpt")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(value, got[key]), f"{key} differs after {kills} kills"
