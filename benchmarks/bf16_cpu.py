"""Is bf16 autocast faster than float32 on this CPU? One table per CPU kind (issue 20).

Times, in float32 and under ``torch.autocast("cpu", torch.bfloat16)``: the linear of issue 20
(a 512x384 input through ``nn.Linear(384, 1536)``) and a ViT-B/32 forward (timm
``vit_base_patch32_224``, random weights) at batch ``--batch``, interleaved, median of
``--repeats`` calls after two warm-ups. The section lands between
``<!-- bf16:cpu-<kind>:... -->`` markers of ``--markdown``, ``<kind>`` from
:func:`lorae.training.precision.cpu_kind` (``amx``, ``avx512_bf16``, ``avx512``, ``avx2``)::

    python benchmarks/bf16_cpu.py --threads 2 --markdown docs/performance.md
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: make `benchmarks` (and a source `lorae`) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import timm
import torch
from torch import nn

from benchmarks.pipeline import _cpu_name
from benchmarks.report import _time, write_section
from lorae.training.precision import describe_cpu


def _call(model: nn.Module, x: torch.Tensor, bf16: bool) -> Callable[[], Any]:
    def run() -> Any:
        context = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.no_grad(), context:
            return model(x)

    return run


def measure(cases: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each case (two warm-ups each, then round-robin)."""
    for run in cases.values():
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    linear, x = nn.Linear(384, 1536).eval(), torch.randn(512, 384)
    vit = timm.create_model(args.backbone, pretrained=False).eval()
    images = torch.randn(args.batch, 3, 224, 224)
    cases = {
        "linear/float32": _call(linear, x, False),
        "linear/bf16": _call(linear, x, True),
        "vit/float32": _call(vit, images, False),
        "vit/bf16": _call(vit, images, True),
    }
    medians = measure(cases, args.repeats)
    return {
        "command": command,
        "backbone": args.backbone,
        "batch": args.batch,
        "threads": args.threads,
        "repeats": args.repeats,
        "medians": medians,
        "environment": {
            "cpu": _cpu_name(),
            "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            **describe_cpu(),
        },
    }


def render_markdown(result: dict[str, Any]) -> str:
    env, t = result["environment"], result["medians"]
    rows = [
        ("512x384 @ 384x1536 linear", "linear"),
        (f"`{result['backbone']}` forward, batch {result['batch']}", "vit"),
    ]
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"Machine: {env['cpu']} (CPU kind `{env['cpu_kind']}`, torch capability "
        f"{env['cpu_capability']}, bf16 flags {env['bf16_flags']}), {result['threads']} "
        f"threads, torch {env['torch']}, {env['date']}; median of {result['repeats']} calls.",
        "",
        "| inference | float32 | bf16 autocast | bf16 / float32 |",
        "|---|---:|---:|---:|",
    ]
    for label, key in rows:
        f32, bf16 = t[f"{key}/float32"], t[f"{key}/bf16"]
        lines.append(f"| {label} | {_time(f32)} | {_time(bf16)} | {bf16 / f32:.2f} |")
    return "\n".join(lines)


def markers(result: dict[str, Any]) -> tuple[str, str]:
    kind = result["environment"]["cpu_kind"]
    return f"<!-- bf16:cpu-{kind}:start -->", f"<!-- bf16:cpu-{kind}:end -->"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vit_base_patch32_224")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    argv_text = sys.argv[1:] if argv is None else list(argv)
    result = run(args, "python benchmarks/bf16_cpu.py " + shlex.join(argv_text))
    text = render_markdown(result)
    if args.markdown is not None:
        write_section(args.markdown, *markers(result), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
