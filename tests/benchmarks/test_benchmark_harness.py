"""The speed harness (benchmarks/): its vmap reference computes the same function as the LoRA
layers, it runs end to end on a tiny model and writes every case and ratio, and its ratio,
memory and Markdown logic is right. No timing is asserted."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from benchmarks import cases as C
from benchmarks import memory
from benchmarks.report import (
    floor_seconds,
    ratios,
    render_markdown,
    train_floor_seconds,
    write_markdown,
)
from benchmarks.speed import main
from benchmarks.vmap_reference import VmapLoRALinear, use_vmap_reference
from lorae.lora import LoRAEnsembleFusedLinear, LoRAEnsembleLinear, LoRASpec
from lorae.methods import LoRAEnsemble
from lorae.training.precision import describe_cpu

ROOT = Path(__file__).resolve().parents[2]
TINY = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2}
TINY_ARGS = [
    "--backbone",
    "vit_tiny_patch16_224",
    "--backbone-overrides",
    json.dumps(TINY),
    "--members",
    "3",
    "--batch",
    "1",
    "2",
    "--rank",
    "2",
    "--train-members",
    "2",
    "--train-batch",
    "2",
    "--extra-train-sizes",
    "3x2",
    "--threads",
    "1",
    "--repeats",
    "2",
    "--fast-repeats",
    "2",
    "--num-classes",
    "5",
]


@pytest.fixture(autouse=True)
def _keep_thread_count() -> Iterator[None]:
    """The harness sets torch's (process-wide) thread count: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


QKV = ("q", "k", "v")


def _layers() -> list[LoRAEnsembleLinear]:
    torch.manual_seed(0)
    layers = [
        # alpha = 4 at rank 2: scale 2, so a forgotten scale is caught
        LoRAEnsembleLinear(nn.Linear(6, 5), 3, LoRASpec(rank=2, alpha=4.0)),
        LoRAEnsembleFusedLinear(nn.Linear(6, 9), QKV, ("q", "v"), 3, LoRASpec(rank=2, alpha=4.0)),
        LoRAEnsembleFusedLinear(nn.Linear(6, 9), QKV, QKV, 3, LoRASpec(rank=2)),
    ]
    for layer in layers:
        nn.init.normal_(layer.B)  # B = 0 at init would hide a wrong delta
    return layers


@pytest.mark.parametrize("index", range(3))
def test_vmap_reference_layer_equals_lora_layer_and_its_gradients(index: int) -> None:
    layer = _layers()[index]
    reference = VmapLoRALinear(copy.deepcopy(layer))
    x = torch.randn(3 * 2, 4, 6)
    out, ref = layer(x), reference(x)
    torch.testing.assert_close(ref, out)
    out.square().sum().backward()
    ref.square().sum().backward()
    for name in ("A", "B"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(getattr(reference.layer, name).grad, grad)


def test_vmap_reference_model_equals_lora_ensemble() -> None:
    torch.manual_seed(0)
    method = LoRAEnsemble(
        4, "vit_tiny_patch16_224", 3, LoRASpec(rank=2), pretrained=False, backbone_overrides=TINY
    )
    for name, param in method.named_parameters():
        if name.endswith(".B"):
            nn.init.normal_(param, std=0.1)
    reference = copy.deepcopy(method)
    replaced = use_vmap_reference(reference)
    assert len(replaced) == 2 * TINY["depth"]  # qkv and proj of every block
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), method(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = reference(x)
    assert low.dtype == torch.bfloat16  # the reference runs in bf16 under autocast too


def _expected_keys(members: int, batches: list[int], skipped: dict[str, str]) -> set[str]:
    keys = set()
    for case in C.DEFAULT_CASES:
        if case in skipped:
            continue
        if case in C.TRAIN_CASES:
            sizes = ["M=2,B=2", *(["M=3,B=2"] if case in C.FLOOR_CASES else [])]
            names = [case, "plain_train_seq"] if case == "plain_train" else [case]
            keys |= {f"{name}@{size}" for name in names for size in sizes}
        elif case == "plain":
            keys |= {f"plain@B={b}" for b in batches} | {f"plain_MB@B={b}" for b in batches}
        else:
            keys |= {f"{case}@B={b}" for b in batches}
    return keys


def test_harness_end_to_end_on_a_tiny_model(tmp_path: Path) -> None:
    out, doc = tmp_path / "speed.json", tmp_path / "performance.md"
    tag = f"cpu-{describe_cpu()['cpu_kind']}-float32"  # one section per CPU kind
    doc.write_text(
        f"# Performance\n\nProse before.\n\n<!-- speed:{tag}:start -->\nold\n"
        f"<!-- speed:{tag}:end -->\n\nProse after.\n"
    )
    args = [*TINY_ARGS, "--no-memory", "--profile", "--output", str(out), "--markdown", str(doc)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    profiled = {"plain@B=2", "plain_MB@B=2", "lorae@B=2", "vmap@B=2"}
    profiled |= {"train_lorae@M=2,B=2", "train_lorae@M=3,B=2"}
    floors = {k for k in result["profiles"] if k.startswith("plain_train")}
    assert {k.split("@")[1] for k in floors} == {"M=2,B=2", "M=3,B=2"}  # the faster term
    profiled |= floors
    assert set(result["profiles"]) == profiled
    assert all("Self CPU" in table for table in result["profiles"].values())
    assert set(result["timings"]) == _expected_keys(3, [1, 2], result["skipped"])
    for key, entry in result["timings"].items():
        assert len(entry["times"]) == 2, key
        assert entry["min"] <= entry["median"] <= entry["max"]
    assert set(result["ratios"]) == {
        "lorae/floor@B=1",
        "lorae/floor@B=2",
        "lorae/plain_MB@B=1",
        "lorae/plain_MB@B=2",
        "explicit_sequential/lorae@B=1",
        "lorae/vmap@M=3,B=2",
        "train_lorae/train_explicit@M=2,B=2",
        *(
            f"{case}/train_floor@{size}"
            for case in ("train_lorae", "train_explicit", "train_peft")
            for size in ("M=2,B=2", "M=3,B=2")
        ),
        "train_peak_memory_lorae/explicit@M=2,B=2",
        "resident_parameters@M=3/backbone",
        "adapter_checkpoint/backbone_checkpoint",
    }
    for name in ("lorae/floor@B=1", "lorae/vmap@M=3,B=2", "train_lorae/train_explicit@M=2,B=2"):
        assert result["ratios"][name]["value"] > 0, name
    for name, r in result["ratios"].items():
        if "/train_floor@" in name:
            assert r["value"] > 0, name  # every method at every size against its floor
    assert result["ratios"]["train_lorae/train_floor@M=3,B=2"]["target"] == "<= 1.1"
    assert result["ratios"]["train_peft/train_floor@M=3,B=2"]["target"] is None
    assert result["checks"]["vmap_vs_lorae_max_abs_diff"] < 1e-5
    for key in ("torch", "cpu", "threads", "device_name", "date", "cpu_kind", "cpu_capability"):
        assert result["environment"][key] not in (None, ""), key
    size = result["size"]
    assert size["lorae_resident"] > size["backbone_resident"]
    assert size["explicit_resident"] > 3 * size["backbone_resident"]
    text = doc.read_text()
    assert text.startswith("# Performance\n\nProse before.") and text.endswith("Prose after.\n")
    assert "\nold\n" not in text and "| case | B = 1 | B = 2 |" in text
    assert "| M x B | training floor | LoRA-Ensemble |" in text
    assert "| 3 x 2 |" in text and "CPU kind `" in text
    assert text.count("<details><summary>Profile of one call") == len(profiled)
    for name in result["ratios"]:
        assert f"`{name}`" in text
    # Rendering the JSON again gives the same section (the doc comes from the run).
    before = text
    assert main(["--from-json", str(out), "--markdown", str(doc)]) == 0
    assert doc.read_text() == before


def _result(medians: dict[str, float], device: str = "cpu") -> dict[str, Any]:
    settings = {
        **C.Settings().__dict__,
        "members": 4,
        "batches": [1, 8],
        "train_members": 2,
        "train_batch": 3,
        "device": device,
    }
    timings = {k: {"times": [v], "median": v, "min": v, "max": v} for k, v in medians.items()}
    return {"settings": settings, "timings": timings}


def test_floor_and_ratios_follow_issue_6_definitions() -> None:
    medians = {
        "plain@B=1": 1.0,  # M * T(B) = 4.0
        "plain_MB@B=1": 5.0,  # T(M*B) = 5.0 -> floor 4.0 (sequential wins)
        "plain@B=8": 3.0,  # M * T(B) = 12.0
        "plain_MB@B=8": 10.0,  # floor 10.0 (one big batch wins)
        "lorae@B=1": 4.2,
        "lorae@B=8": 10.0,
        "vmap@B=8": 20.0,
        "explicit_loop@B=1": 8.4,
        "train_lorae@M=2,B=3": 3.0,
        "train_explicit_loop@M=2,B=3": 10.0,
        "train_explicit_vmap@M=2,B=3": 6.0,
    }
    result = _result(medians)
    assert floor_seconds(result["timings"], 4, 1) == 4.0
    assert floor_seconds(result["timings"], 4, 8) == 10.0
    result["memory"] = {"train_lorae": {"peak_bytes": 30}, "train_explicit": {"peak_bytes": 100}}
    result["size"] = {"resident_ratio": 1.2, "adapter_ratio": 0.1}
    r = ratios(result)
    assert r["lorae/floor@B=1"]["value"] == pytest.approx(1.05)
    assert r["lorae/floor@B=1"]["met"] is True
    assert r["lorae/floor@B=8"]["value"] == pytest.approx(1.0)
    assert r["lorae/plain_MB@B=1"]["value"] == pytest.approx(4.2 / 5.0)
    assert r["explicit_sequential/lorae@B=1"]["value"] == pytest.approx(2.0)
    assert r["lorae/vmap@M=4,B=8"]["value"] == pytest.approx(0.5)
    # against the faster explicit path (vmap here), so 0.5 and met
    assert r["train_lorae/train_explicit@M=2,B=3"]["value"] == pytest.approx(0.5)
    assert r["train_peak_memory_lorae/explicit@M=2,B=3"]["value"] == pytest.approx(0.3)
    assert r["resident_parameters@M=4/backbone"]["met"] is False
    assert r["adapter_checkpoint/backbone_checkpoint"]["met"] is True
    # on a GPU the CPU targets are replaced by the GPU ones (latency, B = 8 vs batch M*B)
    g = ratios(_result(medians, device="cuda"))
    assert g["lorae_latency_ms@M=4,B=1"]["value"] == pytest.approx(4200.0)
    assert g["lorae_latency_ms@M=4,B=1"]["met"] is False
    assert g["lorae/plain_MB@B=8"]["met"] is True and g["lorae/floor@B=8"]["met"] is None


def test_a_failing_case_is_reported_and_the_others_are_still_timed() -> None:
    """One case raising in its warm-up (as vmap training did on CUDA: "LSE is not correctly
    aligned") is recorded as an error; the other cases are timed and the ratio uses the
    explicit path that worked."""
    from benchmarks.speed import Timed, time_interleaved

    calls = {"ok": 0}

    def ok() -> None:
        calls["ok"] += 1

    def broken() -> None:
        raise RuntimeError("LSE is not correctly aligned (strideH)")

    s = C.Settings(device="cpu", warmup=1, repeats=2, slow_repeats=2, fast_repeats=2)
    timings = time_interleaved(
        [Timed("train_explicit_vmap@M=2,B=3", broken), Timed("train_lorae@M=2,B=3", ok)], s
    )
    assert "LSE is not correctly aligned" in timings["train_explicit_vmap@M=2,B=3"]["error"]
    assert len(timings["train_lorae@M=2,B=3"]["times"]) == 2 and calls["ok"] >= 3
    result = _result({"train_lorae@M=2,B=3": 3.0, "train_explicit_loop@M=2,B=3": 12.0})
    result["timings"]["train_explicit_vmap@M=2,B=3"] = timings["train_explicit_vmap@M=2,B=3"]
    r = ratios(result)
    assert r["train_lorae/train_explicit@M=2,B=3"]["value"] == pytest.approx(0.25)
    result.update(
        command="python benchmarks/speed.py",
        environment={"device_name": "cpu", "threads": 1, "torch": "x", "timm": "y", "date": "d"},
        ratios=r,
    )
    assert "failed (RuntimeError: LSE is not correctly aligned" in render_markdown(result)


def test_markdown_marks_missed_targets_and_missing_cases() -> None:
    result = _result({"plain@B=1": 1.0, "plain_MB@B=1": 2.0, "lorae@B=1": 3.0})
    result.update(
        command="python benchmarks/speed.py",
        environment={"device_name": "cpu", "threads": 1, "torch": "x", "timm": "y", "date": "d"},
    )
    result["ratios"] = ratios(result)
    text = render_markdown(result)
    assert "| `lorae/floor@B=1`" in text and "| 1.5 | <= 1.05 | **no** |" in text
    assert "| `lorae/vmap@M=4,B=8`" in text and "| - | <= 0.8 | - |" in text


def test_write_markdown_appends_a_section_for_a_new_device_and_dtype(tmp_path: Path) -> None:
    result = _result({"plain@B=1": 1.0, "plain_MB@B=1": 2.0, "lorae@B=1": 3.0})
    result.update(
        command="c",
        environment={"device_name": "cpu", "threads": 1, "torch": "x", "timm": "y", "date": "d"},
    )
    result["ratios"] = ratios(result)
    doc = tmp_path / "doc.md"
    doc.write_text("# Doc\n")
    write_markdown(doc, result)
    result["settings"]["dtype"] = "bf16"
    write_markdown(doc, result)
    for kind in ("amx", "avx2"):  # one section per CPU kind where the run recorded it
        result["environment"]["cpu_kind"] = kind
        write_markdown(doc, result)
        write_markdown(doc, result)
    text = doc.read_text()
    assert text.startswith("# Doc\n")
    assert text.count("<!-- speed:cpu-float32:start -->") == 1  # a result without a kind
    assert text.count("<!-- speed:cpu-bf16:start -->") == 1
    assert text.count("<!-- speed:cpu-amx-bf16:start -->") == 1
    assert text.count("<!-- speed:cpu-avx2-bf16:start -->") == 1


def test_fit_check_shrinks_the_batch_to_what_is_predicted_to_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gib = 1024**3
    calls: list[int] = []

    def fake_measure(s: Any, shape: Any, method: str, kind: str, members: int, batch: int):
        calls.append(batch)
        return {"peak_bytes": gib + batch * gib // 2}  # 1 GiB + 0.5 GiB per sample

    monkeypatch.setattr(memory, "measure", fake_measure)
    monkeypatch.setattr(memory, "machine_memory", lambda device: (10 * gib, 5 * gib))
    report = memory.fit_check(C.Settings(members=16, fit_batch=32), (3, 16, 16))
    # limit 0.8 * 5 GiB = 4 GiB: 1 GiB + 0.5 GiB * b <= 4 GiB -> b = 6
    assert report["batch"] == 6 and calls == [1, 2, 6]
    assert report["fits"] is False  # fitting only a smaller batch is not "fits at B = 32"
    assert report["predicted_peak_bytes"] == gib + 32 * gib // 2
    calls.clear()
    monkeypatch.setattr(memory, "machine_memory", lambda device: (100 * gib, 90 * gib))
    report = memory.fit_check(C.Settings(members=16, fit_batch=32), (3, 16, 16))
    assert report["batch"] == 32 and report["fits"] is True and calls == [1, 2, 32]


def test_saved_activation_bytes_counts_saved_tensors_not_parameters() -> None:
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU())
    x = torch.randn(3, 7)
    counted = memory.saved_activation_bytes(model, lambda: model(x).sum())
    # linear saves its input (its weight is a parameter: not counted); ReLU saves its output
    assert counted == 3 * 7 * 4 + 3 * 5 * 4


@pytest.mark.slow  # two fresh Python processes: 10-30 s
def test_memory_child_sees_the_explicit_ensemble_parameters() -> None:
    """Two fresh processes: an Explicit Ensemble's training step holds M copies of weights,
    gradients and AdamW moments; LoRA-Ensemble holds one frozen backbone."""
    wide = {"img_size": 16, "patch_size": 8, "embed_dim": 256, "depth": 2, "num_heads": 2}
    s = C.Settings(
        backbone="vit_tiny_patch16_224", backbone_overrides=wide, num_classes=5, rank=2, threads=1
    )
    lorae = memory.measure(s, (3, 16, 16), "lorae", "train", 4, 2)
    explicit = memory.measure(s, (3, 16, 16), "explicit", "train", 4, 2)
    assert "error" not in lorae and "error" not in explicit, (lorae, explicit)
    params = sum(p.numel() for p in C.build_plain(s).parameters())
    assert explicit["peak_bytes"] >= 4 * 4 * params * 4 * 0.9  # weights, grads, 2 moments
    assert explicit["peak_bytes"] > 2 * lorae["peak_bytes"] > 0


@pytest.mark.slow
def test_gpu_check_script_cpu_fallback(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": os.environ.get("PYTHON", "python")}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-tiny"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_bf16.json").read_text())
    assert result["settings"]["dtype"] == "bf16" and result["memory"]["train_lorae"]["peak_bytes"]
    assert "| case | B = 1 | B = 2 |" in (tmp_path / "gpu_bf16.md").read_text()
    assert (tmp_path / "gpu_bf16_compile.json").exists()
    assert (tmp_path / "env.txt").read_text()


def test_training_floor_is_the_faster_term_and_every_method_is_put_against_it() -> None:
    medians = {
        "plain_train@M=2,B=3": 4.0,  # one batch of M*B rows
        "plain_train_seq@M=2,B=3": 5.0,  # M batches of B
        "train_lorae@M=2,B=3": 4.2,
        "train_explicit_loop@M=2,B=3": 12.0,
        "train_explicit_vmap@M=2,B=3": 10.0,
        "train_peft@M=2,B=3": 8.0,
        "plain_train@M=4,B=5": 9.0,
        "plain_train_seq@M=4,B=5": 6.0,  # sequential wins here
        "train_lorae@M=4,B=5": 7.2,
    }
    result = _result(medians)
    result["settings"]["extra_train_sizes"] = [[4, 5]]
    assert train_floor_seconds(result["timings"], 2, 3) == 4.0
    assert train_floor_seconds(result["timings"], 4, 5) == 6.0
    r = ratios(result)
    assert r["train_lorae/train_floor@M=2,B=3"]["value"] == pytest.approx(1.05)
    assert r["train_lorae/train_floor@M=2,B=3"]["met"] is True
    assert r["train_explicit/train_floor@M=2,B=3"]["value"] == pytest.approx(2.5)  # faster path
    assert r["train_peft/train_floor@M=2,B=3"]["value"] == pytest.approx(2.0)
    assert r["train_lorae/train_floor@M=4,B=5"]["value"] == pytest.approx(1.2)
    assert r["train_lorae/train_floor@M=4,B=5"]["met"] is False
    assert r["train_explicit/train_floor@M=4,B=5"]["value"] is None  # not run at that size
    result["settings"]["dtype"] = "bf16"  # the 1.10 target is float32's
    assert ratios(result)["train_lorae/train_floor@M=2,B=3"]["met"] is None
    result["settings"]["dtype"] = "float32"
    result.update(
        command="c",
        environment={"device_name": "cpu", "threads": 1, "torch": "x", "timm": "y", "date": "d"},
        ratios=r,
        skipped_train={"train_explicit_loop@M=4,B=5": "M = 4 full copies need 9 GiB"},
    )
    text = render_markdown(result)
    assert "| 2 x 3 | 4 s (one batch) | 4.2 s (4.2 s-4.2 s), 1.05x floor |" in text
    assert "| 4 x 5 | 6 s (4 batches) |" in text and "not run: M = 4 full copies" in text


def test_explicit_ensemble_too_big_for_memory_is_left_out() -> None:
    s = C.Settings(backbone="vit_tiny_patch16_224", backbone_overrides=TINY)
    params = sum(p.numel() for p in C.build_plain(s).parameters())
    assert C.explicit_too_big(s, 4, 10 * 16 * params * 4) is None
    reason = C.explicit_too_big(s, 4, 16 * params)
    assert reason is not None and "M = 4 full copies" in reason


def test_plain_train_step_gives_gradients_to_the_input_only() -> None:
    s = C.Settings(backbone="vit_tiny_patch16_224", backbone_overrides=TINY)
    backbone = C.build_plain(s)
    x = torch.randn(2, 3, 16, 16)
    loss_one = C.plain_train_step(s, backbone, x)()
    loss_two = C.plain_train_step(s, backbone, x, members=2)()
    assert torch.isfinite(loss_one) and loss_two == pytest.approx(2 * float(loss_one), rel=1e-5)
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
