"""The GPU run of issue 18 (item 4), prepared here: the bundle, the per-method rates, the
training-extent record, the results section and (slow) the whole script on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from experiments import gpu_issue18, make_results, sst2_grid
from tests.experiments.test_sst2_paper import tiny_sst2
from tests.fixtures.builders import write_tiny_bert_folder

ROOT = Path(__file__).resolve().parents[2]


def paper_argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--protocol", "paper", "--data", str(tmp_path), "--output", str(tmp_path / "g"), *extra]


def test_method_lr_trains_each_method_at_its_rate_without_a_search(tmp_path: Path) -> None:
    argv = paper_argv(tmp_path, "--methods", "single_network", "lora_ensemble", "--seeds", "0", "1")
    cells = sst2_grid.plan([*argv, "--method-lr", "single_network=5e-05", "lora_ensemble=7e-05"])
    assert [(c.info["method"], c.info["seed"], c.info["lr"]) for c in cells] == [
        ("single_network", 0, 5e-05),
        ("single_network", 1, 5e-05),
        ("lora_ensemble", 0, 7e-05),
        ("lora_ensemble", 1, 7e-05),
    ]
    for cell in cells:
        assert f"--model.optimizer.init_args.lr={cell.info['lr']}" in cell.args
        # no search ran, so seed 0 trains: it cannot be "the search run, tested"
        assert "reuses_search" not in cell.info
    # --fixed-lr gives the rest their rate
    mixed = sst2_grid.plan([*argv, "--method-lr", "lora_ensemble=7e-05", "--fixed-lr", "1e-05"])
    assert [c.info["lr"] for c in mixed] == [1e-05, 1e-05, 7e-05, 7e-05]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["lora_ensemble=7e-05"], "no rate for single_network"),
        (["single_network=fast", "lora_ensemble=1e-4"], "needs METHOD=LR"),
        (["singel_network=1e-4", "lora_ensemble=1e-4"], "needs METHOD=LR"),
        (["single_network=-1", "lora_ensemble=1e-4"], "positive rate"),
    ],
)
def test_method_lr_rejects_what_it_cannot_use(
    tmp_path: Path, items: list[str], message: str
) -> None:
    argv = paper_argv(tmp_path, "--methods", "single_network", "lora_ensemble")
    with pytest.raises(SystemExit, match=message):
        sst2_grid.plan([*argv, "--method-lr", *items])
    with pytest.raises(SystemExit, match="replace the search"):
        sst2_grid.plan([*argv, "--method-lr", "single_network=1", "lora_ensemble=1", "--lrs", "1"])


def test_pack_rounds_the_weights_and_restore_gives_them_back_in_float32(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data, _ = tiny_sst2(tmp_path)
    model = write_tiny_bert_folder(tmp_path / "bert")
    records = tmp_path / "records"
    records.mkdir()
    (records / "lr_selection.json").write_text(json.dumps({"single_network": {"lr": 2e-05}}))
    bundle = tmp_path / "bundle"
    gpu_issue18.pack(data, model, records, bundle, limit_mib=64)

    info = json.loads((bundle / "bundle.json").read_text())
    assert info["rates"]["single_network"]["lr"] == 2e-05
    assert info["rates"]["lora_ensemble"]["lr"] == gpu_issue18.FALLBACK_LR
    assert "not chosen" in info["rates"]["lora_ensemble"]["source"]
    assert info["train_rows"] == 24
    assert gpu_issue18.method_lr_items(bundle) == ["single_network=2e-05", "lora_ensemble=5e-05"]
    assert not (bundle / "minilm" / "model.safetensors").exists()  # only the float16 file travels
    assert (bundle / "sst2" / "dev.tsv").read_text() == (data / "sst2" / "dev.tsv").read_text()

    original = load_file(str(model / "model.safetensors"))
    restored = load_file(str(gpu_issue18.restore(bundle)))
    assert restored.keys() == original.keys()
    change = 0.0
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype
        if tensor.is_floating_point():
            assert torch.equal(restored[name], tensor.half().float()), name
            change = max(change, (restored[name] - tensor).abs().max().item())
        else:
            assert torch.equal(restored[name], tensor), name
    assert 0 < change == info["weights"]["max_abs_change"] < 1e-2
    # the restored folder loads as the backbone's weights
    from lorae.backbones.hf_bert import build_hf_bert

    backbone = build_hf_bert("all-MiniLM-L6-v2", str(bundle / "minilm"), None)
    embeddings = backbone.model.get_input_embeddings().weight.detach()
    assert torch.equal(embeddings, original["embeddings.word_embeddings.weight"].half().float())


def test_pack_says_what_is_missing_and_what_is_too_big(tmp_path: Path) -> None:
    data, _ = tiny_sst2(tmp_path)
    model = write_tiny_bert_folder(tmp_path / "bert")
    (data / "agnews" / "dev.tsv").unlink()
    with pytest.raises(SystemExit, match=r"missing .*agnews/dev.tsv.*\.\./shared/data"):
        gpu_issue18.pack(data, model, tmp_path, tmp_path / "b1", limit_mib=64)
    (data / "agnews" / "dev.tsv").write_text("a\tWorld\n")
    with pytest.raises(SystemExit, match=r"over the 0\.001 MiB that can travel"):
        gpu_issue18.pack(data, model, tmp_path, tmp_path / "b2", limit_mib=0.001)
    with pytest.raises(SystemExit, match=r"run `gpu_issue18\.py pack` first"):
        gpu_issue18.restore(tmp_path / "nothing")


def test_epochs_record_tells_a_run_stopped_by_its_time_limit(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "csv").mkdir(parents=True)
    rows = ["epoch,step,train/loss,val/acc,test/acc"]
    rows += [f"0,{s},0.5,," for s in (49, 99)] + ["0,99,,0.8,"]  # a whole first epoch
    rows += ["1,149,0.4,,", "1,199,0.3,,", "1,200,,,0.81"]  # stopped in the second, tested
    (run / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    record = gpu_issue18.epochs_record(run, steps_per_epoch=100, max_epochs=3)
    assert record == {
        "epochs_validated": 1,
        "max_epochs": 3,
        "last_logged_step": 200,
        "steps_planned": 300,
        "fraction_trained": pytest.approx(0.6667),
    }


def fake_gpu_records(folder: Path) -> None:
    for method, acc, lr in (("lora_ensemble", 0.9, 7e-05), ("single_network", 0.88, 5e-05)):
        run = folder / "runs" / method / "seed0"
        run.mkdir(parents=True)
        metrics = {"test/acc": acc, "test/f1": acc, "test/ece": 0.05, "test/nll": 0.3}
        metrics |= {"test/brier": 0.1, "test/ood/agnews/msp/auroc": 0.8}
        metrics |= {"test/ood/agnews/msp/auprc": 0.7}
        (run / "metrics.json").write_text(json.dumps({"metrics": metrics, "method": {}}))
        (run / "run.json").write_text(json.dumps({"lr": lr, "seed": 0, "wall_seconds": 123.4}))
        epochs = {"epochs_validated": 2, "max_epochs": 3, "last_logged_step": 9000}
        (run / "epochs.json").write_text(json.dumps({**epochs, "steps_planned": 11364}))
    (folder / "bundle.json").write_text(
        json.dumps({"train_rows": 60614, "weights": {"max_abs_change": 0.00098}})
    )
    (folder / "env.txt").write_text(
        "|   0  NVIDIA H200                    On  |   00000000:00:05.0 Off |\n"
    )
    argv = ["--protocol", "paper", "--data", "runs/gpu_bundle", "--output", "/tmp/x"]
    (folder / "grid.json").write_text(json.dumps({"argv": argv, "invocations": [argv]}))


def test_results_doc_gets_the_gpu_section_from_the_records(tmp_path: Path) -> None:
    records = tmp_path / "sst2_full"
    fake_gpu_records(records)
    section = gpu_issue18.gpu_section(records)
    assert section.startswith(gpu_issue18.GPU_HEADING)
    assert "all 60,614 sentences" in section and "on NVIDIA H200" in section
    assert "| lora_ensemble | 7e-05 | 2 of 3 | 9,000 / 11,364 | 123 |" in section
    assert "0.9000" in section and "0.8800" in section  # the quality table
    assert "--data runs/gpu_bundle" in section  # the command that ran
    none = tmp_path / "none"
    doc = make_results.render(none, none, none, tmp_path / "r.md", none, none, none, None, records)
    assert gpu_issue18.GPU_HEADING in doc
    assert gpu_issue18.gpu_section(none) == ""
    # --keep-earlier-sections regenerates it like the other issue 18 sections
    assert gpu_issue18.GPU_HEADING not in make_results.earlier_sections(doc)


@pytest.mark.slow
def test_gpu_script_runs_both_methods_end_to_end_on_cpu(tmp_path: Path) -> None:
    """The whole script with a tiny bundle (`--cpu-tiny`: one epoch on CPU, no speed step):
    both methods are trained and tested at their own rates and come back as records."""
    data, _ = tiny_sst2(tmp_path)
    model = write_tiny_bert_folder(tmp_path / "bert")
    bundle = tmp_path / "bundle"
    gpu_issue18.pack(data, model, tmp_path, bundle, limit_mib=64)
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "WORK": str(work), "PYTHON": "python"}
    env["BUDGET_S"] = "900"
    done = subprocess.run(
        ["bash", str(ROOT / "experiments" / "gpu_issue18.sh"), str(bundle), "--cpu-tiny"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    log = (out / "issue18_gpu.log").read_text() if (out / "issue18_gpu.log").is_file() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log[-4000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "env.txt",
        "issue18_gpu.log",
        "sst2_full_records.tar.gz",
    ]
    with tarfile.open(out / "sst2_full_records.tar.gz") as tar:
        tar.extractall(tmp_path / "back", filter="data")
    records = tmp_path / "back" / "sst2_full"
    for method in gpu_issue18.GPU_METHODS:
        run = records / "runs" / method / "seed0"
        assert "test/acc" in json.loads((run / "metrics.json").read_text())["metrics"]
        assert json.loads((run / "run.json").read_text())["lr"] == gpu_issue18.FALLBACK_LR
        epochs = json.loads((run / "epochs.json").read_text())
        assert epochs["epochs_validated"] == 1 and epochs["steps_planned"] == 2  # 24 rows / 16
    assert (records / "runs" / "lora_ensemble" / "seed0" / "weight_diversity.json").is_file()
    assert gpu_issue18.GPU_HEADING in gpu_issue18.gpu_section(records)
