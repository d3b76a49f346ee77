"""The bf16-on-a-slow-CPU warning (issue 20): CPU kind and native bf16 from the CPU flags (or
torch's capability where the flags cannot be read), and the warning a bf16 run gets at start,
with the CPU faked."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from lightning.pytorch import Trainer

from lorae.cli import main
from lorae.training import CPUPrecisionCheck, CPUPrecisionWarning, default_callbacks
from lorae.training import precision as P
from tests.fixtures.tiny_configs import digits_lora_config, write_config

AVX2 = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}
ZEN4 = AVX512 | {"avx512_bf16"}
SAPPHIRE = ZEN4 | {"amx_tile", "amx_bf16", "amx_int8"}


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\n")
    assert P.cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # aarch64
    assert P.cpu_flags(info) == {"fp", "asimd", "bf16"}
    assert P.cpu_flags(tmp_path / "absent") is None


@pytest.mark.parametrize(
    ("flags", "capability", "kind", "native"),
    [
        (SAPPHIRE, "AVX512", "amx", True),
        (ZEN4, "AVX512", "avx512_bf16", True),  # this build machine's kind
        (AVX512, "AVX512", "avx512", False),  # AVX-512 alone does not make bf16 fast
        (AVX2, "AVX2", "avx2", False),  # the machine of issue 20
        (None, "AVX2", "avx2", False),  # no /proc/cpuinfo: the capability decides
        (None, "AVX512", "avx512", False),  # ... and cannot vouch for bf16
        (None, "SVE256", "sve256", True),
    ],
)
def test_cpu_kind_and_native_bf16(
    flags: frozenset[str] | None, capability: str, kind: str, native: bool
) -> None:
    assert P.cpu_kind(flags, capability) == kind
    assert P.native_bf16(flags, capability) is native


def test_warning_only_for_bf16_on_a_cpu_that_emulates_it() -> None:
    message = P.bf16_cpu_warning("bf16-mixed", "cpu", AVX2, "AVX2")
    assert message is not None
    assert "'avx2'" in message and "AVX2" in message
    assert "83 ms" in message and "9 ms" in message and "13 steps in 16 minutes" in message
    assert "--trainer.precision=32-true" in message
    assert P.bf16_cpu_warning("bf16-true", "cpu", AVX512, "AVX512") is not None
    assert P.bf16_cpu_warning("32-true", "cpu", AVX2, "AVX2") is None
    assert P.bf16_cpu_warning("bf16-mixed", "cuda", AVX2, "AVX2") is None
    assert P.bf16_cpu_warning("bf16-mixed", "cpu", ZEN4, "AVX512") is None
    assert P.bf16_cpu_warning("bf16-mixed", "cpu", SAPPHIRE, "AVX512") is None


def _setup_warnings(
    monkeypatch: pytest.MonkeyPatch, precision: str, flags: frozenset[str] | None, capability: str
) -> list[warnings.WarningMessage]:
    monkeypatch.setattr(P, "cpu_flags", lambda: flags)
    monkeypatch.setattr(P, "cpu_capability", lambda: capability)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,  # type: ignore[arg-type]
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CPUPrecisionCheck().setup(trainer, None, "fit")  # type: ignore[arg-type]
    return [w for w in caught if issubclass(w.category, CPUPrecisionWarning)]


def test_callback_warns_at_setup_with_a_faked_avx2_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    caught = _setup_warnings(monkeypatch, "bf16-mixed", AVX2, "AVX2")
    assert len(caught) == 1 and "83 ms" in str(caught[0].message)
    # torch's capability alone (no readable flags) still warns on an AVX2 CPU
    assert len(_setup_warnings(monkeypatch, "bf16-mixed", None, "AVX2")) == 1


def test_callback_is_silent_with_bf16_hardware_or_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _setup_warnings(monkeypatch, "bf16-mixed", SAPPHIRE, "AVX512") == []
    assert _setup_warnings(monkeypatch, "bf16-mixed", ZEN4, "AVX512") == []
    assert _setup_warnings(monkeypatch, "32-true", AVX2, "AVX2") == []


def test_every_run_gets_the_check() -> None:
    assert any(isinstance(c, CPUPrecisionCheck) for c in default_callbacks())


def test_lorae_fit_in_bf16_warns_on_a_faked_avx2_cpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The whole command: the check is attached before Lightning's setup hook runs."""
    monkeypatch.setattr(P, "cpu_flags", lambda: AVX2)
    monkeypatch.setattr(P, "cpu_capability", lambda: "AVX2")
    config = write_config(tmp_path / "config.yaml", digits_lora_config(num_members=2))
    with pytest.warns(CPUPrecisionWarning, match="AMD EPYC with AVX2 only"):
        main(
            [
                "fit",
                "--config",
                str(config),
                "--trainer.precision=bf16-mixed",
                "--trainer.fast_dev_run=true",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
