"""Issue 18, item 4: the GPU run, prepared here and run once on a lent GPU machine.

The GPU machine has torch, lightning, transformers and timm, but no internet, no pretrained
weights, none of ``../shared/data`` and no ``jsonargparse``; what it needs travels with the
working tree (at most 64 MiB, ``carry``). This module packs that bundle here and, on the GPU
machine, restores the weights and summarises the runs for the trip back (at most 8 files, two
folders deep):

    # here: the bundle (SST-2, AG News, all-MiniLM-L6-v2 in float16, the CPU grid's rates)
    python experiments/gpu_issue18.py pack --data /work/shared/data --output runs/gpu_bundle
    # there (benchmarks' device tool, carry runs/gpu_bundle and .whl): the whole item
    bash experiments/gpu_issue18.sh runs/gpu_bundle

``pack`` writes ``<output>/sst2/{train,dev}.tsv``, ``<output>/agnews/dev.tsv``,
``<output>/minilm/`` (``config.json``, the tokenizer files and ``model.fp16.safetensors``: every
float32 tensor rounded to float16, which halves the 87 MB of weights to fit the transfer limit;
the largest change of a weight is about 1e-3) and ``bundle.json`` (the learning rates the CPU
paper grid chose, from its ``lr_selection.json``, and the rounding's size). ``restore`` writes
``model.safetensors`` back in float32 from the float16 file on the GPU machine, so the runs start
from the rounded weights (not bit-identical to the CPU runs' backbone; said in the results).
``rates`` prints the ``--method-lr`` items of the bundle. ``summarize`` writes each run's
``epochs.json`` (validated epochs and last step against the planned ones, from its CSV log:
``trainer.max_time`` may stop a run early, and then it is tested as it stands) and the records
(``keep_records.py``) as one ``tar.gz`` for the trip back.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python experiments/gpu_issue18.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Methods of the GPU run (issue 18 item 4) and their rate when the CPU grid has none yet.
GPU_METHODS = ("single_network", "lora_ensemble")
#: The paper's rate for LoRA fine-tuning of BERT on SST-2 (appendix W's MAP training), used
#: for a method the CPU grid has not chosen a rate for yet.
FALLBACK_LR = 5e-5
DEFAULT_RECORDS = Path("experiments/records/2026-12-01/sst2_paper")
#: Files of a Hugging Face BERT folder the run needs besides the weights, and the tokenizer
#: files copied where the folder has them (``tokenizer.json`` or ``vocab.txt`` or both).
MODEL_FILES = ("config.json", "tokenizer_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "special_tokens_map.json")
DATA_FILES = ("sst2/train.tsv", "sst2/dev.tsv", "agnews/dev.tsv")
HALF_WEIGHTS = "model.fp16.safetensors"
WEIGHTS = "model.safetensors"
#: What may travel with the working tree (the device tool's limit), in MiB.
TRANSFER_LIMIT_MIB = 64.0


def chosen_rates(records: Path) -> dict[str, dict[str, Any]]:
    """Per :data:`GPU_METHODS` method the rate to train at and where it comes from."""
    path = records / "lr_selection.json"
    selection = json.loads(path.read_text()) if path.is_file() else {}
    rates = {}
    for method in GPU_METHODS:
        if method in selection:
            rates[method] = {"lr": float(selection[method]["lr"]), "source": str(path)}
        else:
            rates[method] = {
                "lr": FALLBACK_LR,
                "source": "not chosen by the CPU grid yet: the paper's LoRA rate for SST-2 "
                "(appendix W)",
            }
    return rates


def _half(tensors: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Float32 tensors as float16 (others as they are) and the largest absolute change."""
    import torch

    halved, change = {}, 0.0
    for name, tensor in tensors.items():
        if tensor.dtype == torch.float32:
            if tensor.abs().max().item() > torch.finfo(torch.float16).max:
                raise SystemExit(f"error: weight {name!r} overflows float16; cannot halve it")
            halved[name] = tensor.half()
            change = max(change, (halved[name].float() - tensor).abs().max().item())
        else:
            halved[name] = tensor
    return halved, change


def pack(data: Path, model: Path, records: Path, output: Path, limit_mib: float) -> Path:
    """Write the bundle into ``output`` (see the module docstring); returns ``bundle.json``.

    Raises:
        SystemExit: A data or model file is missing, or the bundle is over ``limit_mib``.
    """
    from safetensors.torch import load_file, save_file

    missing = [str(data / f) for f in DATA_FILES if not (data / f).is_file()]
    missing += [str(model / f) for f in (*MODEL_FILES, WEIGHTS) if not (model / f).is_file()]
    if missing:
        raise SystemExit(
            f"error: missing {', '.join(missing)}. --data needs sst2/train.tsv, sst2/dev.tsv and "
            "agnews/dev.tsv (../shared/data); --model a BERT folder with config.json, the "
            "tokenizer files and model.safetensors (pip install 'lorae[minilm]' gives "
            "all-MiniLM-L6-v2's)"
        )
    for relative in DATA_FILES:
        (output / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data / relative, output / relative)
    (output / "minilm").mkdir(parents=True, exist_ok=True)
    for name in (*MODEL_FILES, *TOKENIZER_FILES):
        if (model / name).is_file():
            shutil.copyfile(model / name, output / "minilm" / name)
    halved, change = _half(load_file(str(model / WEIGHTS)))
    save_file(halved, str(output / "minilm" / HALF_WEIGHTS))
    (output / "minilm" / WEIGHTS).unlink(missing_ok=True)  # restore writes it there
    info = {
        "rates": chosen_rates(records),
        "model": str(model),
        "weights": {"file": HALF_WEIGHTS, "max_abs_change": change},
        "train_rows": sum(1 for _ in (data / "sst2/train.tsv").open(encoding="utf-8")) - 1,
    }
    path = output / "bundle.json"
    path.write_text(json.dumps(info, indent=2) + "\n")
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file()) / 2**20
    if size > limit_mib:
        raise SystemExit(
            f"error: the bundle {output} is {size:.1f} MiB, over the {limit_mib:g} MiB that can "
            "travel; leave out what the run does not need"
        )
    print(
        f"Bundle {output}: {size:.1f} MiB; rates {info['rates']}; weights rounded by "
        f"at most {change:.2g}"
    )
    return path


def restore(bundle: Path) -> Path:
    """Write ``minilm/model.safetensors`` (float32) from the float16 file; returns it."""
    import torch
    from safetensors.torch import load_file, save_file

    source = bundle / "minilm" / HALF_WEIGHTS
    if not source.is_file():
        raise SystemExit(f"error: no {source}: run `gpu_issue18.py pack` first")
    tensors = {
        name: t.float() if t.dtype == torch.float16 else t
        for name, t in load_file(str(source)).items()
    }
    target = bundle / "minilm" / WEIGHTS
    save_file(tensors, str(target))
    return target


def method_lr_items(bundle: Path) -> list[str]:
    """``METHOD=LR`` items of ``sst2_grid.py --method-lr`` from ``bundle.json``."""
    rates = json.loads((bundle / "bundle.json").read_text())["rates"]
    return [f"{method}={rate['lr']:g}" for method, rate in rates.items()]


def epochs_record(run: Path, steps_per_epoch: int, max_epochs: int) -> dict[str, Any]:
    """How far a run trained, from its CSV log: validated epochs and the last logged step."""
    validated: set[int] = set()
    last_step = -1
    log = run / "csv" / "metrics.csv"
    if log.is_file():
        with log.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row.get("val/acc"):
                    validated.add(int(row["epoch"]))
                if row.get("train/loss"):
                    last_step = max(last_step, int(row["step"]))
    planned = steps_per_epoch * max_epochs
    return {
        "epochs_validated": len(validated),
        "max_epochs": max_epochs,
        "last_logged_step": last_step + 1,
        "steps_planned": planned,
        "fraction_trained": round(min(1.0, (last_step + 1) / planned), 4) if planned else None,
    }


def summarize(grid: Path, bundle: Path, out: Path, batch_size: int, max_epochs: int) -> Path:
    """Write ``epochs.json`` into each run of ``grid`` and its records as
    ``out/sst2_full_records.tar.gz``; returns the archive."""
    from experiments.keep_records import records

    rows = json.loads((bundle / "bundle.json").read_text())["train_rows"]
    steps_per_epoch = math.ceil(rows / batch_size)
    for run in sorted(grid.glob("runs/*/seed*")):
        record = epochs_record(run, steps_per_epoch, max_epochs)
        (run / "epochs.json").write_text(json.dumps(record, indent=2) + "\n")
        metrics = run / "metrics.json"
        accuracy = (
            json.loads(metrics.read_text())["metrics"].get("test/acc")
            if metrics.is_file()
            else None
        )
        print(f"{run.relative_to(grid)}: {record}, test/acc {accuracy}")
    shutil.copyfile(bundle / "bundle.json", grid / "bundle.json")
    out.mkdir(parents=True, exist_ok=True)
    archive = out / "sst2_full_records.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for relative in records(grid):
            tar.add(grid / relative, arcname=f"sst2_full/{relative.as_posix()}")
    return archive


def _count(value: Any) -> str:
    return "n/a" if value is None else f"{value:,}"


GPU_HEADING = "## SST-2 on the full training set, on a GPU (issue 18, item 4)"
GPU_SCRIPT = "bash experiments/gpu_issue18.sh runs/gpu_bundle"


def gpu_section(folder: Path) -> str:
    """The results section of the GPU run's kept records (``sst2_full`` of the archive), or
    nothing while there are none."""
    from experiments import make_results as mr  # it imports this module's section lazily

    reports = mr.load_runs(folder) if folder.is_dir() else []
    if not reports:
        return ""
    bundle_path = folder / "bundle.json"
    bundle = json.loads(bundle_path.read_text()) if bundle_path.is_file() else {}
    env_path = folder / "env.txt"
    lines = env_path.read_text().splitlines() if env_path.is_file() else []
    names = (re.search(r"NVIDIA [\w-]+(?: [\w-]+)*", line) for line in lines if "SMI" not in line)
    gpus = [name.group(0) for name in names if name]
    change = bundle.get("weights", {}).get("max_abs_change")
    parts = [
        f"{GPU_HEADING}\n",
        "\nThe Single Network and LoRA-Ensemble (M = 8) with the paper's settings (appendix M) on "
        f"all {_count(bundle.get('train_rows'))} sentences of `sst2/train.tsv`, seed 0, tested "
        "on the same test part and AG News texts as the CPU grid, at the rates the CPU grid "
        "chose"
        + (f", on {gpus[0]}" if gpus else "")
        + ". Both ran at once on the one GPU inside one time-limited call "
        "(`trainer.max_time`); the second table says how far each trained. The backbone is "
        "all-MiniLM-L6-v2 with its weights rounded to float16 for the transfer"
        + (f" (largest change {change:.1g})" if change is not None else "")
        + ", so it is not bit-identical to the CPU runs'. One seed: no spread.\n\n"
        f"```bash\n{GPU_SCRIPT}\n"
        f"{mr.grid_argv_command(folder, 'python experiments/sst2_grid.py', GPU_SCRIPT)}\n```\n\n",
        mr.table(reports, [*mr.QUALITY, *mr.SST2_OOD]),
        "\n| method | lr | epochs validated | steps trained / planned | wall s |\n"
        "|---|---|---|---|---|\n",
    ]
    for report in reports:
        run = report["_folder"]
        record = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
        epochs_path = run / "epochs.json"
        epochs = json.loads(epochs_path.read_text()) if epochs_path.is_file() else {}
        wall = report["compute"].get("wall_seconds")
        parts.append(
            f"| {report['method']['method']} | {record.get('lr', 'n/a')} | "
            f"{epochs.get('epochs_validated', 'n/a')} of {epochs.get('max_epochs', 'n/a')} | "
            f"{_count(epochs.get('last_logged_step'))} / {_count(epochs.get('steps_planned'))} | "
            f"{'n/a' if wall is None else f'{wall:,.0f}'} |\n"
        )
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="write the bundle (here)")
    p.add_argument("--data", type=Path, required=True, help="folder holding sst2/ and agnews/")
    p.add_argument("--model", type=Path, default=None, help="default: the packaged MiniLM")
    p.add_argument("--records", type=Path, default=DEFAULT_RECORDS, help="the CPU paper grid")
    p.add_argument("--output", type=Path, default=Path("runs/gpu_bundle"))
    p.add_argument("--limit-mib", type=float, default=TRANSFER_LIMIT_MIB)
    r = commands.add_parser("restore", help="float32 weights from the float16 file (there)")
    r.add_argument("bundle", type=Path)
    q = commands.add_parser("rates", help="print the --method-lr items")
    q.add_argument("bundle", type=Path)
    s = commands.add_parser("summarize", help="epochs.json per run and the records archive")
    s.add_argument("grid", type=Path)
    s.add_argument("--bundle", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "pack":
        model = args.model
        if model is None:
            from lorae.backbones.hf_bert import packaged_model_path

            model = Path(packaged_model_path("all-MiniLM-L6-v2"))
        pack(args.data, model, args.records, args.output, args.limit_mib)
    elif args.command == "restore":
        print(f"Restored {restore(args.bundle)}")
    elif args.command == "rates":
        print(" ".join(method_lr_items(args.bundle)))
    else:
        archive = summarize(args.grid, args.bundle, args.out, args.batch_size, args.epochs)
        print(f"Records: {archive}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
