"""Peak memory of one configuration, measured in a fresh process; what training would need.

Peak memory is a property of a whole process, so each configuration runs alone in a child
(``python -m benchmarks.memory SPEC``): on CPU its peak resident set size
(the kernel's high-water mark ``VmHWM``, reset to the current size right after the imports,
minus that size; ``getrusage(RUSAGE_SELF).ru_maxrss`` minus its value after the imports where
the mark cannot be reset); on CUDA ``torch.cuda.max_memory_allocated``. The figure includes
the model's construction, its parameters, gradients and AdamW states (a first step at batch 1
allocates them before the measured step), activations and workspace.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from benchmarks.cases import (
    Settings,
    adamw,
    autocast,
    build_explicit,
    build_lorae,
    build_plain,
    infer,
    input_shape,
    make_inputs,
    synchronize,
    train_step,
)

ROOT = Path(__file__).resolve().parents[1]
Method = Literal["lorae", "explicit", "plain"]
Kind = Literal["train", "infer"]


def settings_from_dict(data: dict[str, Any]) -> Settings:
    """Inverse of ``dataclasses.asdict`` (JSON turns tuples into lists)."""
    sizes = tuple((int(m), int(b)) for m, b in data.get("extra_train_sizes", ()))
    return Settings(
        **{
            **data,
            "batches": tuple(data["batches"]),
            "cases": tuple(data["cases"]),
            "extra_train_sizes": sizes,
        }
    )


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes, if readable."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def start_rss_peak() -> tuple[int, str]:
    """Baseline for :func:`peak_rss_since`: the resident size now, with the kernel's
    high-water mark reset to it (``/proc/self/clear_refs``), so that the import's own
    transient peak does not hide a smaller model. Where that is not possible, the baseline
    is ``ru_maxrss`` so far (peaks below the import's are then reported as 0)."""
    rss = _status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        rss = None
    if rss is not None and _status_bytes("VmHWM") is not None:
        return rss, "VmHWM"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "ru_maxrss"


def peak_rss_since(method: str) -> int:
    """The peak resident size (bytes) since :func:`start_rss_peak` reset it."""
    ru_maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    hwm = _status_bytes("VmHWM") if method == "VmHWM" else None
    return ru_maxrss if hwm is None else hwm


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one configuration, run it, and report its peak memory (in this process)."""
    s = settings_from_dict(spec["settings"])
    torch.set_num_threads(s.threads)
    method: Method = spec["method"]
    kind: Kind = spec["kind"]
    members, batch = int(spec["members"]), int(spec["batch"])
    baseline, rss_method = (0, "cuda") if s.device == "cuda" else start_rss_peak()
    if method == "lorae":
        model: nn.Module = build_lorae(s, members)
    elif method == "explicit":
        model = build_explicit(s, members)
        model.vectorize = "auto"
    else:
        model = build_plain(s)
    model.to(s.device)
    shape = (int(spec["shape"][0]), int(spec["shape"][1]), int(spec["shape"][2]))
    x, y = make_inputs(shape, batch, s.num_classes, s.seed, s.device)
    if kind == "train":
        optimizer = adamw(model)
        x1, y1 = make_inputs(shape, 1, s.num_classes, s.seed, s.device)
        train_step(s, model, optimizer, x1, y1)()  # type: ignore[arg-type]
        step = train_step(s, model, optimizer, x, y)  # type: ignore[arg-type]
    else:
        step = infer(s, model, x)
    start = time.perf_counter()
    step()
    synchronize(s.device)
    seconds = time.perf_counter() - start
    if s.device == "cuda":
        peak = int(torch.cuda.max_memory_allocated())
    else:
        peak = peak_rss_since(rss_method) - baseline
    return {
        "peak_bytes": peak,
        "baseline_bytes": baseline,
        "measured_by": rss_method,
        "step_seconds": seconds,
    }


def measure(
    s: Settings,
    shape: tuple[int, int, int],
    method: Method,
    kind: Kind,
    members: int,
    batch: int,
) -> dict[str, Any]:
    """Peak memory of ``method`` (``kind`` step, ``members`` x ``batch`` inputs of ``shape``
    ``(C_in, H, W)``) in a fresh process.

    Returns the child's report plus the configuration, or ``{"error": ...}`` when it failed.
    """
    spec = {
        "settings": asdict(s),
        "method": method,
        "kind": kind,
        "members": members,
        "batch": batch,
        "shape": list(shape),
    }
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    config = {"method": method, "kind": kind, "members": members, "batch": batch}
    if done.returncode != 0:
        return {**config, "error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"}
    return {**config, **json.loads(done.stdout.strip().splitlines()[-1])}


def machine_memory(device: str) -> tuple[int, int]:
    """``(total, available)`` bytes of host memory (CPU) or of GPU 0 (CUDA)."""
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return int(total), int(free)
    info: dict[str, int] = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"], info.get("MemAvailable", info["MemFree"])


def fit_check(s: Settings, shape: tuple[int, int, int]) -> dict[str, Any]:
    """Does an M-member LoRA-Ensemble training step at ``fit_batch`` fit in this machine?

    Running it blindly could push a shared machine into the kernel's OOM killer, so the peak
    is first measured at B = 1 and B = 2, extrapolated linearly (activations grow with B),
    and the step then runs at ``fit_batch`` or, when that would exceed 80% of the memory
    available now, at the largest batch predicted to fit.
    """
    total, available = machine_memory(s.device)
    m = s.members
    small = [measure(s, shape, "lorae", "train", m, b) for b in (1, 2)]
    report: dict[str, Any] = {
        "members": m,
        "requested_batch": s.fit_batch,
        "machine_bytes": total,
        "available_bytes": available,
    }
    if any("error" in r for r in small):
        return {**report, "error": next(r["error"] for r in small if "error" in r)}
    p1, p2 = small[0]["peak_bytes"], small[1]["peak_bytes"]
    per_sample = max(p2 - p1, 1)

    def predicted(b: int) -> int:
        return int(p1 + per_sample * (b - 1))

    limit = 0.8 * available
    batch = s.fit_batch
    if predicted(batch) > limit:
        batch = max(1, min(batch, int((limit - p1) / per_sample) + 1))
    final = small[batch - 1] if batch <= 2 else measure(s, shape, "lorae", "train", m, batch)
    report.update(
        batch=batch,
        predicted_peak_bytes=predicted(s.fit_batch),
        per_sample_bytes=per_sample,
        measured=final,
    )
    if "error" in final:
        return {**report, "fits": False, "error": final["error"]}
    report["peak_bytes"] = final["peak_bytes"]
    report["fits"] = batch == s.fit_batch and final["peak_bytes"] <= total
    return report


def saved_activation_bytes(model: nn.Module, loss_of: Any) -> int:
    """Bytes of the tensors autograd saves for backward while ``loss_of()`` runs, each
    storage counted once, parameters left out (they are counted as parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_of()
    return sum(seen.values())


def explicit_need(s: Settings) -> dict[str, Any]:
    """What an M-member Explicit Ensemble training step at ``fit_batch`` needs (computed).

    Per member: the float32 parameters of one backbone plus its head, their gradients and
    AdamW's two moment estimates (4 copies; bf16-mixed keeps float32 master weights too), plus
    the activations autograd saves in one member's forward at ``fit_batch`` (measured here
    with :func:`saved_activation_bytes` under the run's dtype). Times M members.
    """
    backbone = build_plain(s).to(s.device).requires_grad_(True)
    head = nn.Linear(backbone.feature_dim, s.num_classes).to(s.device)
    model = nn.Sequential(backbone, head).train()
    x, y = make_inputs(input_shape(backbone), s.fit_batch, s.num_classes, s.seed, s.device)

    def loss_of() -> Tensor:
        with autocast(s):
            return nn.functional.cross_entropy(model(x).float(), y)

    activations = saved_activation_bytes(model, loss_of)
    parameters = sum(p.numel() for p in model.parameters())
    state = 4 * parameters * 4
    total, _ = machine_memory(s.device)
    need = s.members * (state + activations)
    return {
        "members": s.members,
        "batch": s.fit_batch,
        "parameters_per_member": parameters,
        "state_bytes_per_member": state,
        "activation_bytes_per_member": activations,
        "total_bytes": need,
        "machine_bytes": total,
        "fits": need <= total,
    }


if __name__ == "__main__":
    print(json.dumps(run_child(json.loads(sys.argv[1]))))
