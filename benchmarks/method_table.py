"""Write the method table of ``docs/methods.md``: parameter counts measured on the real models.

Every method is built from its CIFAR-100 config (``configs/cifar100/*.yaml``: ViT-B/32, 16
members, 100 classes) with ``pretrained: false`` on PyTorch's ``meta`` device, so shapes are
real but no memory is allocated (16 full backbones included). Run from the repository root:

    python benchmarks/method_table.py            # rewrites the table in docs/methods.md
    python benchmarks/method_table.py --print    # prints it instead
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import torch
import yaml

from lorae.methods import EnsembleMethod

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "methods.md"
START, END = "<!-- method-table:start -->", "<!-- method-table:end -->"
NUM_CLASSES = 100

#: config stem -> (method, where the paper defines or studies it)
PAPER: dict[str, tuple[str, str]] = {
    "single_network": ("Single Network", "Tab. 1 (full fine-tuning)"),
    "single_lora": ("Single network with LoRA", "Sec. 3, Eq. 3 with M = 1"),
    "lora_ensemble": ("LoRA-Ensemble", "Sec. 3, Eq. 3: W_i = W_0 + B_i A_i"),
    "explicit_ensemble": ("Explicit Ensemble", "Sec. 5; weight-noise init App. O"),
    "mc_dropout": ("MC Dropout", "Sec. 5 (Gal and Ghahramani 2016)"),
    "batch_ensemble": ("BatchEnsemble", "App. I.1: W_i = W ∘ (r_i s_iᵀ)"),
    "batch_ensemble_pp": ("BatchEnsemble++", "App. I.2: W_i = W + r_i s_iᵀ"),
    "snapshot_ensemble": ("Snapshot Ensemble", "App. U (cyclic cosine, M snapshots)"),
    "film_ensemble": ("FiLM-Ensemble", "App. V (member LayerNorm affines)"),
    "bayes_lora": ("Bayes-LoRA", "App. W (K-FAC Laplace over LoRA)"),
}


def build(config: Path) -> EnsembleMethod:
    """The config's method, randomly initialised on the meta device."""
    spec = yaml.safe_load(config.read_text())["model"]["method"]
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    init_args = {**spec.get("init_args", {}), "pretrained": False}
    with torch.device("meta"):
        method = cls(NUM_CLASSES, **init_args)
    assert isinstance(method, EnsembleMethod)
    return method


def count(method: EnsembleMethod) -> tuple[int, int]:
    """(trainable parameters, all stored parameters and buffers)."""
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    stored = sum(p.numel() for p in method.parameters()) + sum(b.numel() for b in method.buffers())
    return trainable, stored


def table() -> str:
    rows = [
        "| Method | Paper | M | Trainable parameters | Stored (params + buffers) | Config |",
        "|---|---|---:|---:|---:|---|",
    ]
    for stem, (title, where) in PAPER.items():
        config = ROOT / "configs" / "cifar100" / f"{stem}.yaml"
        method = build(config)
        trainable, stored = count(method)
        rows.append(
            f"| {title} | {where} | {method.num_members} | {trainable:,} | {stored:,} "
            f"| [`{config.relative_to(ROOT)}`](../{config.relative_to(ROOT)}) |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print instead of writing the doc")
    args = parser.parse_args()
    text = table()
    if args.print:
        print(text)
        return
    doc = DOC.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)
    DOC.write_text(pattern.sub(f"{START}\n{text}\n{END}", doc))
    print(f"Table written to {DOC}")


if __name__ == "__main__":
    main()
