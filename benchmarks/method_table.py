"""Write the method table of ``docs/methods.md``: parameter counts measured on the real models.

Every registered method (:data:`lorae.methods.METHODS`) is built from its CIFAR-100 configs
(``configs/cifar100/*.yaml``: ViT-B/32, 16 members, 100 classes; a variant such as
``single_lora`` is a config of its own) with ``pretrained: false`` on PyTorch's ``meta``
device, so shapes are real but no memory is allocated (16 full backbones included). A
registered method without a CIFAR-100 config, or a config without a row title here, stops the
script. Run from the repository root:

    python benchmarks/method_table.py            # rewrites the table in docs/methods.md
    python benchmarks/method_table.py --print    # prints it instead
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from lorae.cli.compose import load_composed
from lorae.lora import LoRASpec
from lorae.methods import METHODS, EnsembleMethod, class_path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "methods.md"
START, END = "<!-- method-table:start -->", "<!-- method-table:end -->"
NUM_CLASSES = 100

#: config stem -> (row title, where the paper defines or studies it), in the table's row order
PAPER: dict[str, tuple[str, str]] = {
    "single_network": ("Single Network", "Tab. 1 (full fine-tuning)"),
    "single_lora": ("Single network with LoRA", "Sec. 3, Eq. 3 with M = 1"),
    "lora_ensemble": ("LoRA-Ensemble", "Sec. 3, Eq. 3: W_i = W_0 + B_i A_i"),
    "explicit_ensemble": ("Explicit Ensemble", "Sec. 5; weight-noise init App. O"),
    "mc_dropout": ("MC Dropout", "Sec. 4, App. T: DropKey (Li et al. 2023)"),
    "batch_ensemble": ("BatchEnsemble", "App. I.1: W_i = W ∘ (r_i s_iᵀ)"),
    "batch_ensemble_pp": ("BatchEnsemble++", "App. I.2: W_i = W + r_i s_iᵀ"),
    "snapshot_ensemble": ("Snapshot Ensemble", "App. U (cyclic cosine, M snapshots)"),
    "film_ensemble": ("FiLM-Ensemble", "App. V (member LayerNorm affines)"),
    "bayes_lora": ("Bayes-LoRA", "App. W (K-FAC Laplace over LoRA)"),
}


def method_spec(config: Path) -> dict[str, Any]:
    """The ``model.method`` entry of a config (``class_path``, ``init_args``)."""
    spec: dict[str, Any] = load_composed(config)["model"]["method"]  # with its base.yaml
    return spec


def build(config: Path) -> EnsembleMethod:
    """The config's method, randomly initialised on the meta device."""
    spec = method_spec(config)
    classes = {class_path(cls): cls for cls in METHODS.values()}
    cls = classes[spec["class_path"]]
    init_args = {**spec.get("init_args", {}), "pretrained": False}
    if "lora" in init_args:  # what the CLI does with the mapping in a config
        init_args["lora"] = LoRASpec(**init_args["lora"])
    with torch.device("meta"):
        return cls(NUM_CLASSES, **init_args)


def configs_by_method() -> dict[str, list[Path]]:
    """Registered method name -> its CIFAR-100 configs.

    Raises:
        SystemExit: a registered method has no config, or a config has no :data:`PAPER` row.
    """
    configs = sorted(p for p in (ROOT / "configs" / "cifar100").glob("*.yaml") if p.stem != "base")
    untitled = [c.name for c in configs if c.stem not in PAPER]
    if untitled:
        raise SystemExit(f"method_table.py: add a PAPER row for {untitled}")
    found: dict[str, list[Path]] = {}
    for name, cls in METHODS.items():
        mine = [c for c in configs if method_spec(c)["class_path"] == class_path(cls)]
        if not mine:
            raise SystemExit(f"method_table.py: registered method {name!r} has no CIFAR-100 config")
        found[name] = mine
    return found


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
    found = [c for configs in configs_by_method().values() for c in configs]
    for config in sorted(found, key=lambda c: list(PAPER).index(c.stem)):
        title, where = PAPER[config.stem]
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
