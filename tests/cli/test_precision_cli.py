"""bf16-mixed precision (issue 6, item 5): ``lorae fit`` and ``lorae test`` with
``--trainer.precision bf16-mixed`` on CPU, and LoRA-Ensemble logits under bf16 autocast
agreeing with float32 within a stated tolerance. (The layer-level bf16 test is in
``tests/lora/test_layers.py``; this one is the whole model and the command line.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorae.cli import main
from lorae.lora import LoRASpec
from lorae.methods import LoRAEnsemble
from tests.cli.test_cli import check_test_metrics, only_file, read_metrics
from tests.fixtures.tiny_configs import (
    TIMM_DIGITS_OVERRIDES,
    checkpoint_callback,
    digits_lora_config,
    write_config,
)

#: bf16 keeps 8 significant bits: every rounding of an operand or a result is off by at most
#: u = 2^-8 (0.39%) relatively. A tiny 2-block ViT's logits go through about 12 rounded
#: matmuls (patch embedding, per block qkv, q·k, attention·v, proj, two MLP layers; the
#: head), and rounding errors of independent roundings add up roughly like a random walk, so
#: a few u of the logits' scale is expected (measured here: 2.5-3.3u with adapters that move
#: the logits by about their own scale; 1-1.5u for the backbone alone); 8u = 3.1% of the
#: largest |logit| is the bound. A model that lost its LoRA deltas under autocast is off by
#: far more (checked below).
BF16_UNIT_ROUNDOFF = 2.0**-8
LOGIT_TOLERANCE = 8 * BF16_UNIT_ROUNDOFF


def test_fit_and_test_in_bf16_mixed_give_finite_metrics(tmp_path: Path) -> None:
    config = digits_lora_config(num_members=2)
    config["trainer"]["callbacks"] = [checkpoint_callback(tmp_path / "ckpt")]
    cfg = write_config(tmp_path / "config.yaml", config)
    bf16 = "--trainer.precision=bf16-mixed"
    main(
        [
            "fit",
            "--config",
            str(cfg),
            bf16,
            f"--trainer.default_root_dir={tmp_path / 'fit'}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            "--test_after_fit=false",
        ]
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    lora = {k: v for k, v in checkpoint["state_dict"].items() if k.endswith((".A", ".B"))}
    assert lora, "no LoRA factors in the checkpoint"
    # bf16-mixed trains float32 master weights (bf16 is only the compute dtype) ...
    assert all(v.dtype == torch.float32 for v in lora.values())
    # ... and the steps did train them (B starts at zero).
    assert any(k.endswith(".B") and v.abs().sum() > 0 for k, v in lora.items())
    main(
        [
            "test",
            "--config",
            str(cfg),
            bf16,
            "--ckpt_path",
            str(last),
            f"--trainer.default_root_dir={tmp_path / 'test'}",
            "--trainer.limit_test_batches=2",
        ]
    )
    check_test_metrics(read_metrics(only_file(tmp_path / "test", "metrics.json")), 2)


def _tiny_lora_ensemble() -> LoRAEnsemble:
    torch.manual_seed(0)
    method = LoRAEnsemble(
        10,
        "vit_tiny_patch16_224",
        num_members=4,
        lora=LoRASpec(rank=2),
        pretrained=False,
        backbone_overrides=TIMM_DIGITS_OVERRIDES,
    )
    for name, param in method.named_parameters():
        if name.endswith(".B"):  # trained-looking adapters: B = 0 would hide the LoRA path
            nn.init.normal_(param, std=0.02)
    return method.eval()


def test_bf16_autocast_logits_agree_with_float32() -> None:
    method = _tiny_lora_ensemble()
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = method(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = method(x)
    assert full.dtype == torch.float32 and mixed.dtype == torch.bfloat16
    scale = full.abs().max()
    error = (mixed.float() - full).abs().max()
    assert error <= LOGIT_TOLERANCE * scale, f"bf16 off by {error / scale:.4f} of max |logit|"
    # The tolerance is tight enough to catch a lost LoRA delta: without the adapters the
    # logits move by much more than it.
    with torch.no_grad():
        for name, param in method.named_parameters():
            if name.endswith(".B"):
                param.zero_()
        plain = method(x)
    assert (plain - full).abs().max() > 4 * LOGIT_TOLERANCE * scale
