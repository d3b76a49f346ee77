"""Which CPU a run is on, and a warning when bf16 is asked for on a CPU without bf16 hardware.

bf16 autocast is a large speed-up only where the CPU computes in bf16 natively: AMX tiles
(``amx_bf16``, Intel Sapphire Rapids and later) or the AVX-512 bf16 dot products
(``avx512_bf16``, e.g. AMD Zen 4). Elsewhere (AVX2 only, or AVX-512 without its bf16
extension) every bf16 matmul is emulated, and bf16-mixed training is several times *slower*
than float32. ``torch.backends.cpu.get_cpu_capability()`` cannot tell these apart (it says
``"AVX512"`` with or without ``avx512_bf16``, and ``"AVX2"`` on the AVX2-only machines), so
the kernel's CPU flags (``/proc/cpuinfo``) decide where they can be read, and the capability
only where they cannot.

:class:`CPUPrecisionCheck` (one of :func:`lorae.training.default_callbacks`) warns at the
start of every stage that runs in bf16 on such a CPU, citing the measured cost.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_only

__all__ = [
    "BF16_SLOW_CPU_MEASUREMENTS",
    "CPUPrecisionCheck",
    "CPUPrecisionWarning",
    "bf16_cpu_warning",
    "cpu_capability",
    "cpu_flags",
    "cpu_kind",
    "describe_cpu",
    "native_bf16",
]

CPUINFO = Path("/proc/cpuinfo")

#: What bf16 costs where the CPU has no bf16 hardware (issue 20; measured, not estimated).
BF16_SLOW_CPU_MEASUREMENTS = (
    "measured on a 2-core AMD EPYC with AVX2 only (no avx512_bf16, no AMX): one "
    "512x384 @ 384x1536 linear took 83 ms under bf16 autocast against 9 ms in float32 (9x "
    "slower), and `lorae fit` of the SST-2/MiniLM LoRA-Ensemble with "
    "--trainer.precision=bf16-mixed made 13 steps in 16 minutes"
)


class CPUPrecisionWarning(UserWarning):
    """bf16 was asked for on a CPU that emulates it."""


def cpu_flags(path: Path = CPUINFO) -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``) of its
    first processor; ``None`` where the file cannot be read (macOS, Windows, sandboxes)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def cpu_capability() -> str:
    """``torch.backends.cpu.get_cpu_capability()``: the vector ISA torch's kernels were picked
    for (``"AVX2"``, ``"AVX512"``, ``"DEFAULT"``, ``"NO AVX"``, ``"VSX"``, ``"Z VECTOR"``,
    ``"SVE256"``, ...), or ``"unknown"`` where this torch cannot say."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def cpu_kind(flags: frozenset[str] | None, capability: str) -> str:
    """A short name for the kind of CPU, as far as bf16 speed goes: ``"amx"``,
    ``"avx512_bf16"`` (AVX-512 with its bf16 dot products, no AMX), else torch's capability in
    lower case (``"avx512"``, ``"avx2"``, ...). ``flags``: :func:`cpu_flags` (``None``: not
    readable); ``capability``: :func:`cpu_capability`."""
    if flags is not None:
        if "amx_bf16" in flags:
            return "amx"
        if "avx512_bf16" in flags:
            return "avx512_bf16"
    return capability.lower().replace(" ", "_")


def native_bf16(flags: frozenset[str] | None, capability: str) -> bool:
    """Whether the CPU computes bf16 matmuls in hardware: ``amx_bf16`` or ``avx512_bf16`` (x86)
    or ``bf16`` (Arm) among its flags. Without readable flags, only a capability that implies
    it counts (none of torch 2.x's x86 values does: ``"AVX512"`` is given with and without the
    bf16 extension), so an unknown x86 CPU is taken as emulating bf16."""
    if flags is not None:
        return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})
    return capability.upper() in ("AMX", "AMX_BF16", "SVE256")


def describe_cpu() -> dict[str, object]:
    """This machine's CPU as the benchmarks record it: torch's capability, the kind
    (:func:`cpu_kind`), whether bf16 is native (:func:`native_bf16`) and the bf16/AMX flags
    it has (``None``: flags not readable)."""
    flags, capability = cpu_flags(), cpu_capability()
    return {
        "cpu_capability": capability,
        "cpu_kind": cpu_kind(flags, capability),
        "native_bf16": native_bf16(flags, capability),
        "bf16_flags": None
        if flags is None
        else sorted(f for f in flags if "bf16" in f or "amx" in f),
    }


def bf16_cpu_warning(
    precision: str, device_type: str, flags: frozenset[str] | None, capability: str
) -> str | None:
    """The warning for running at ``precision`` on a ``device_type`` device of this CPU, or
    ``None`` when there is nothing to warn about (not bf16, not a CPU, or bf16 hardware)."""
    if "bf16" not in precision or device_type != "cpu" or native_bf16(flags, capability):
        return None
    return (
        f"--trainer.precision={precision} on a CPU without bf16 hardware (kind "
        f"{cpu_kind(flags, capability)!r}: torch capability {capability}, no avx512_bf16 or "
        f"amx_bf16 flag). bf16 is emulated here and much slower than float32: "
        f"{BF16_SLOW_CPU_MEASUREMENTS}. Use --trainer.precision=32-true on this machine; "
        "bf16-mixed pays off on CPUs with AMX or avx512_bf16 and on GPUs (docs/performance.md)."
    )


class CPUPrecisionCheck(Callback):
    """Warns once per stage, on rank 0, when the trainer runs bf16 on a CPU that emulates it
    (see :func:`bf16_cpu_warning`)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        message = bf16_cpu_warning(
            str(trainer.precision),
            trainer.strategy.root_device.type,
            cpu_flags(),
            cpu_capability(),
        )
        if message is not None:
            _warn(message)


@rank_zero_only
def _warn(message: str) -> None:
    warnings.warn(message, CPUPrecisionWarning, stacklevel=2)
