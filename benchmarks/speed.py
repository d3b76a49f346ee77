"""Speed and memory of LoRA-Ensemble against the hardware floor, the Explicit Ensemble and the
paper's vmap implementation (issue 6), in one interleaved run.

Run from the repository root (``docs/performance.md`` explains every number):

    python benchmarks/speed.py --threads 2 --output speed.json --markdown docs/performance.md
    python benchmarks/speed.py --dtype bf16 ...          # bf16-mixed autocast
    python benchmarks/speed.py --from-json speed.json --markdown docs/performance.md

Timing: every case gets ``--warmup`` untimed calls, then the cases run round-robin
(``--repeats`` rounds; cases whose warm-up took longer than ``--slow-seconds`` only
``--slow-repeats``), so slow drifts of a shared machine hit every case alike. Reported:
median, min and max seconds per call.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: make `benchmarks` (and a source `lorae`) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import gc
import json
import os
import platform
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import timm
import torch
from torch import nn

from benchmarks import cases as C
from benchmarks.memory import (
    explicit_need,
    fit_check,
    machine_memory,
    measure,
    settings_from_dict,
)
from benchmarks.report import (
    inference_key,
    ratios,
    render_markdown,
    summary,
    train_floor_key,
    train_key,
    write_markdown,
)
from lorae.checkpoints.adapters import adapter_state_dict, tensor_bytes
from lorae.methods import LoRAEnsemble
from lorae.training.precision import describe_cpu

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Timed:
    """One timed entry: its key in the JSON and the call it times."""

    key: str
    run: Callable[[], Any]


def log(message: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def time_interleaved(entries: Sequence[Timed], s: C.Settings) -> dict[str, dict[str, Any]]:
    """Warm every entry up, then time them round-robin; returns the summary per key.

    An entry whose warm-up raises is left out of the timing and reported as
    ``{"error": message}``, so one failing case (e.g. a backend without a kernel for it)
    cannot cost the others' results.
    """
    rounds: dict[str, int] = {}
    warm: dict[str, float] = {}
    failed: dict[str, dict[str, Any]] = {}
    for entry in entries:
        start = time.perf_counter()
        try:
            for _ in range(s.warmup):
                entry.run()
            C.synchronize(s.device)
        except (RuntimeError, NotImplementedError) as error:
            failed[entry.key] = {"error": f"{type(error).__name__}: {error}"}
            log(f"warm-up {entry.key}: FAILED ({error})")
            continue
        warm[entry.key] = (time.perf_counter() - start) / max(s.warmup, 1)
        rounds[entry.key] = (
            s.slow_repeats
            if warm[entry.key] > s.slow_seconds
            else s.fast_repeats
            if warm[entry.key] < s.fast_seconds
            else s.repeats
        )
        log(f"warm-up {entry.key}: {warm[entry.key]:.3f} s")
    entries = [e for e in entries if e.key not in failed]
    times: dict[str, list[float]] = {e.key: [] for e in entries}
    for r in range(max(rounds.values(), default=0)):
        for entry in entries:
            if r >= rounds[entry.key]:
                continue
            if warm[entry.key] < s.fast_seconds:
                # A fast case right after a slow one would pay for the slow one's freed
                # buffers (page faults, cold caches): one untimed call settles it.
                entry.run()
            C.synchronize(s.device)
            start = time.perf_counter()
            entry.run()
            C.synchronize(s.device)
            times[entry.key].append(time.perf_counter() - start)
        log(f"round {r + 1} done")
    return {**{k: {**summary(v), "warmup_seconds": warm[k]} for k, v in times.items()}, **failed}


def profile_entries(entries: Sequence[Timed], keys: set[str], s: C.Settings) -> dict[str, str]:
    """``torch.profiler`` tables (top operators by self time) of one call of each entry in
    ``keys``: where the time of a missed target goes."""
    from torch.profiler import ProfilerActivity, profile

    cuda = s.device == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    tables: dict[str, str] = {}
    for entry in entries:
        if entry.key not in keys:
            continue
        with profile(activities=activities) as prof:
            entry.run()
            C.synchronize(s.device)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        tables[entry.key] = prof.key_averages().table(sort_by=sort, row_limit=15)
        log(f"profiled {entry.key}")
    return tables


def _explicit_call(model: Any, mode: str, call: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        model.vectorize = mode  # one model, two paths: no second copy of M backbones
        return call()

    return run


def inference_entries(
    s: C.Settings, shape: tuple[int, int, int], wanted: set[str]
) -> tuple[list[Timed], dict[str, Any]]:
    """The inference entries (models built and moved to the device) and correctness checks."""
    m, entries, checks = s.members, [], {}
    inputs = {b: C.make_inputs(shape, b, s.num_classes, s.seed, s.device)[0] for b in s.batches}
    if "plain" in wanted:
        plain = C.build_plain(s).to(s.device)
        for b in s.batches:
            big = C.make_inputs(shape, m * b, s.num_classes, s.seed, s.device)[0]
            entries.append(Timed(inference_key("plain", b), C.infer(s, plain, inputs[b])))
            entries.append(Timed(inference_key("plain_MB", b), C.infer(s, plain, big)))
    variants: dict[str, Callable[[], nn.Module]] = {
        "lorae": lambda: C.build_lorae(s, m),
        "lorae_one_batch": lambda: C.build_lorae(s, m, chunk=None),
        "lorae_auto": lambda: C.build_lorae(s, m, chunk="auto"),
        "lorae_compiled": lambda: C.build_lorae(s, m, compiled=True),
        "vmap": lambda: C.build_vmap_reference(s, m),
    }
    built: dict[str, nn.Module] = {}
    for case, build in variants.items():
        if case in wanted:
            built[case] = build().to(s.device)
            entries += [
                Timed(inference_key(case, b), C.infer(s, built[case], inputs[b])) for b in s.batches
            ]
    if "lorae" in built and "vmap" in built:
        b = min(s.batches)
        diff = C.infer(s, built["lorae"], inputs[b])() - C.infer(s, built["vmap"], inputs[b])()
        checks["vmap_vs_lorae_max_abs_diff"] = float(diff.abs().max())
    if wanted & {"explicit_loop", "explicit_vmap"}:
        explicit = C.build_explicit(s, m).to(s.device)
        for mode in ("loop", "vmap"):
            if f"explicit_{mode}" in wanted:
                entries += [
                    Timed(
                        inference_key(f"explicit_{mode}", b),
                        _explicit_call(explicit, mode, C.infer(s, explicit, inputs[b])),
                    )
                    for b in s.batches
                ]
    return entries, checks


def _train_model(s: C.Settings, case: str, members: int) -> LoRAEnsemble:
    if case == "train_lorae_compiled":
        return C.build_lorae(s, members, compiled=True)
    if case == "train_vmap":
        return C.build_vmap_reference(s, members)
    return C.build_lorae(s, members)


def train_entries(
    s: C.Settings, shape: tuple[int, int, int], wanted: set[str], size: tuple[int, int]
) -> tuple[list[Timed], dict[str, str]]:
    """The training-step entries at ``size`` = (M, B): every training case at
    ``train_members`` x ``train_batch``, only the training-floor cases
    (:data:`~benchmarks.cases.FLOOR_CASES`) at the ``extra_train_sizes``; and the cases left
    out, with the reason (an Explicit Ensemble too big for this machine's memory)."""
    entries: list[Timed] = []
    left_out: dict[str, str] = {}
    _, available = machine_memory(s.device)
    m, b = size
    first = size == C.train_sizes(s)[0]
    here = wanted if first else wanted & set(C.FLOOR_CASES)
    x, y = C.make_inputs(shape, b, s.num_classes, s.seed, s.device)
    if "plain_train" in here:
        plain = C.build_plain(s).to(s.device)
        big = C.make_inputs(shape, m * b, s.num_classes, s.seed, s.device)[0]
        entries.append(Timed(train_key("plain_train", m, b), C.plain_train_step(s, plain, big)))
        entries.append(
            Timed(train_key("plain_train_seq", m, b), C.plain_train_step(s, plain, x, m))
        )
    for case in ("train_lorae", "train_lorae_compiled", "train_vmap"):
        if case in here:
            model = _train_model(s, case, m).to(s.device)
            step = C.train_step(s, model, C.adamw(model), x, y)
            entries.append(Timed(train_key(case, m, b), step))
    if "train_peft" in here:
        single = C.build_lorae(s, 1).to(s.device)
        entries.append(Timed(train_key("train_peft", m, b), C.peft_steps(s, single, m, x, y)))
    explicit_modes = [mode for mode in ("loop", "vmap") if f"train_explicit_{mode}" in here]
    too_big = C.explicit_too_big(s, m, available) if explicit_modes else None
    if too_big is not None:
        for mode in explicit_modes:
            left_out[train_key(f"train_explicit_{mode}", m, b)] = too_big
    elif explicit_modes:
        explicit = C.build_explicit(s, m).to(s.device)
        step = C.train_step(s, explicit, C.adamw(explicit), x, y)
        for mode in explicit_modes:
            key = train_key(f"train_explicit_{mode}", m, b)
            entries.append(Timed(key, _explicit_call(explicit, mode, step)))
    return entries, left_out


def size_report(s: C.Settings) -> dict[str, Any]:
    """Parameter and checkpoint sizes at M = ``members``, counted on the meta device."""
    with torch.device("meta"):
        plain = C.build_plain(s)
        lorae = C.build_lorae(s, s.members)
        explicit = C.build_explicit(s, s.members)

    def resident(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())

    adapter_bytes = tensor_bytes(adapter_state_dict(lorae))
    backbone_bytes = tensor_bytes(plain.state_dict())
    return {
        "members": s.members,
        "backbone_resident": resident(plain),
        "lorae_resident": resident(lorae),
        "explicit_resident": resident(explicit),
        "resident_ratio": resident(lorae) / resident(plain),
        "adapter_bytes": adapter_bytes,
        "backbone_bytes": backbone_bytes,
        "adapter_ratio": adapter_bytes / backbone_bytes,
    }


def auto_chunk(s: C.Settings) -> dict[str, int] | None:
    """Members per chunk that ``member_chunk_size="auto"`` picks at each B on this device
    (``None`` in builds without the option)."""
    try:
        from lorae.lora.chunks import auto_chunk_size
    except ImportError:
        return None
    device = torch.device(s.device)
    return {f"B={b}": auto_chunk_size(s.members, b, device) for b in s.batches}


def environment(s: C.Settings) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device_name = torch.cuda.get_device_name(0) if s.device == "cuda" else cpu
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        **describe_cpu(),
        "cpu_count": os.cpu_count(),
        "threads": s.threads,
        "device_name": device_name,
        "commit": commit,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run(s: C.Settings, command: str, profile: bool = False) -> dict[str, Any]:
    """The whole harness: timings, sizes, memory, ratios (the JSON written by ``main``);
    with ``profile``, operator tables of the plain, LoRA-Ensemble and vmap calls at the
    largest B and of the LoRA-Ensemble training step."""
    torch.set_num_threads(s.threads)
    skipped = C.skipped_variants(s.cases)
    wanted = set(s.cases) - set(skipped)
    shape = C.input_shape(C.build_plain(s))
    result: dict[str, Any] = {
        "command": command,
        "settings": asdict(s),
        "environment": environment(s),
        "lorae_options": {k: repr(v) for k, v in C.lorae_options().items()},
        "skipped": skipped,
        "timings": {},
    }
    if s.memory:  # first, while this process holds no model: the fit check reads free memory
        log("peak memory, each configuration in a fresh process")
        mt, bt = s.train_members, s.train_batch
        result["memory"] = {
            "train_lorae": measure(s, shape, "lorae", "train", mt, bt),
            "train_explicit": measure(s, shape, "explicit", "train", mt, bt),
        }
        log(f"fit check: M = {s.members} LoRA-Ensemble training at B = {s.fit_batch}")
        result["fit"] = fit_check(s, shape)
        result["explicit_need"] = explicit_need(s)
    log(f"inference cases, M = {s.members}, B = {list(s.batches)}")
    entries, result["checks"] = inference_entries(s, shape, wanted)
    result["timings"].update(time_interleaved(entries, s))
    result["profiles"] = {}
    if profile:
        b = max(s.batches)
        keys = {inference_key(c, b) for c in ("plain", "plain_MB", "lorae", "vmap")}
        result["profiles"].update(profile_entries(entries, keys, s))
    del entries
    gc.collect()
    result["skipped_train"] = {}
    for m, b in C.train_sizes(s):  # one size at a time: only its models are resident
        log(f"training cases, M = {m}, B = {b}")
        entries, skipped_train = train_entries(s, shape, wanted, (m, b))
        result["skipped_train"].update(skipped_train)
        result["timings"].update(time_interleaved(entries, s))
        if profile:
            # where a training step's time goes: LoRA-Ensemble and the faster floor term
            floor = train_floor_key(result["timings"], m, b)
            keys = {train_key("train_lorae", m, b), *([floor] if floor else [])}
            result["profiles"].update(profile_entries(entries, keys, s))
        del entries
        gc.collect()
    if s.device == "cuda":
        torch.cuda.empty_cache()  # the memory children need the GPU memory this process cached
    result["size"] = size_report(s)
    result["auto_chunk"] = auto_chunk(s)
    result["ratios"] = ratios(result)
    return result


def _size(text: str) -> tuple[int, int]:
    """``"16x32"`` -> ``(16, 32)``: members x batch."""
    m, sep, b = text.lower().partition("x")
    if not sep or not m.isdigit() or not b.isdigit() or int(m) < 1 or int(b) < 1:
        raise argparse.ArgumentTypeError(f"expected MxB such as 16x32, got {text!r}")
    return int(m), int(b)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = C.Settings()
    p.add_argument("--backbone", default=d.backbone)
    p.add_argument(
        "--backbone-overrides",
        type=json.loads,
        default={},
        help='architecture overrides as JSON, e.g. \'{"depth": 2, "img_size": 32}\'',
    )
    p.add_argument("--num-classes", type=int, default=d.num_classes)
    p.add_argument("--members", type=int, default=d.members, help="M of inference and checks")
    p.add_argument("--batch", type=int, nargs="+", default=list(d.batches), help="B values")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--train-members", type=int, default=d.train_members)
    p.add_argument("--train-batch", type=int, default=d.train_batch)
    p.add_argument(
        "--extra-train-sizes",
        type=_size,
        nargs="*",
        default=list(d.extra_train_sizes),
        metavar="MxB",
        help="further (M, B) of the training-floor cases, e.g. 16x32",
    )
    p.add_argument("--fit-batch", type=int, default=d.fit_batch, help="B of the M-member fit check")
    p.add_argument("--dtype", choices=["float32", "bf16"], default=d.dtype)
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--slow-repeats", type=int, default=d.slow_repeats)
    p.add_argument("--slow-seconds", type=float, default=d.slow_seconds)
    p.add_argument("--fast-repeats", type=int, default=d.fast_repeats)
    p.add_argument("--fast-seconds", type=float, default=d.fast_seconds)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--cases", nargs="+", choices=C.ALL_CASES, default=list(C.DEFAULT_CASES))
    p.add_argument("--no-memory", action="store_true", help="skip peak memory and fit checks")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--profile",
        action="store_true",
        help="add torch.profiler operator tables (plain, lorae, vmap at the largest B; the "
        "lorae training step) to the JSON and the Markdown",
    )
    p.add_argument("--output", type=Path, help="write the JSON result here")
    p.add_argument("--markdown", type=Path, help="write the Markdown section into this file")
    p.add_argument("--from-json", type=Path, help="render an earlier result instead of running")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        settings_from_dict(result["settings"])  # fails early on a foreign JSON
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("speed.py: --device cuda but torch sees no GPU.")
        s = C.Settings(
            backbone=args.backbone,
            backbone_overrides=args.backbone_overrides,
            num_classes=args.num_classes,
            members=args.members,
            batches=tuple(args.batch),
            rank=args.rank,
            train_members=args.train_members,
            train_batch=args.train_batch,
            extra_train_sizes=tuple(args.extra_train_sizes),
            fit_batch=args.fit_batch,
            dtype=args.dtype,
            device=args.device,
            threads=args.threads,
            repeats=args.repeats,
            slow_repeats=args.slow_repeats,
            slow_seconds=args.slow_seconds,
            fast_repeats=args.fast_repeats,
            fast_seconds=args.fast_seconds,
            warmup=args.warmup,
            cases=tuple(args.cases),
            memory=not args.no_memory,
            seed=args.seed,
        )
        argv_text = sys.argv[1:] if argv is None else list(argv)
        command = "python benchmarks/speed.py " + shlex.join(argv_text)
        result = run(s, command, profile=args.profile)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
    if args.markdown is not None:
        write_markdown(args.markdown, result)
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
