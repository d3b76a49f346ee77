"""The issue 18 paper-protocol SST-2 grid and gain sweep, without training: the cell list of
the dry run, per-epoch resume, the choice by validation accuracy, the cost estimates, and the
results document (Tab. 8-like table, gain table and figure, cost table) from fake records."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from experiments import (
    compare_rerun,
    estimate_cost,
    keep_records,
    make_results,
    runner,
    sst2_grid,
    sst2_paper,
)
from experiments.runner import Cell, run_cell
from lorae.cli.compose import load_composed

REPO = Path(__file__).resolve().parents[2]
TWO_HOURS = 2 * 3600.0


def paper_argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--data", str(tmp_path / "data"), "--output", str(tmp_path / "grid"), *extra]


def commands(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("lorae")]


def test_paper_dry_run_lists_every_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sst2_paper.main(["grid", *paper_argv(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = commands(out)
    methods = sst2_grid.PAPER_METHODS
    assert {"bayes_lora", "mc_dropout", "explicit_ensemble", "batch_ensemble"} <= set(methods)
    assert len(lines) == len(methods) * 3 + len(methods) * 3  # 3 lrs at seed 0, then 3 seeds
    search = [c for c in lines if "--test_after_fit=false" in c]
    assert len(search) == len(methods) * 3 and all("--seed_everything=0" in c for c in search)
    for method in methods:
        rates = {
            c.split("--model.optimizer.init_args.lr=")[1].split()[0]
            for c in search
            if f"/{method}.yaml" in c
        }
        assert rates == {"2e-05", "5e-05", "7e-05"}, method  # the paper's grid (appendix M)
        tested = [c for c in lines if f"/{method}.yaml" in c and "--test_after_fit=true" in c]
        assert len(tested) == 3
        assert {c.split("--seed_everything=")[1].split()[0] for c in tested} == {"0", "1", "2"}
    for line in lines:
        assert "--trainer.max_epochs=3" in line and "--trainer.precision=32-true" in line
        assert "--data.init_args.train_limit=4000" in line
        ensemble = any(f"/{m}.yaml" in line for m in sst2_grid.ENSEMBLES)
        assert ("--model.method.init_args.num_members=8" in line) == ensemble, line
        # Bayes-LoRA's members are free draws of its predictive: its config's 512 (app. W)
        assert ("num_members" in line) == ensemble, line
    assert "bayes_lora" not in sst2_grid.ENSEMBLES
    assert sst2_grid.members_of(sst2_grid.parse(paper_argv(tmp_path)), "bayes_lora") == 512
    # every cell is listed with its estimate, and the plan is summed
    assert out.count(" CPU-h)") + out.count(" CPU-h;") == len(lines)
    # seed 0's tested cell of every method tests the search run at the chosen rate
    reused = [line for line in out.splitlines() if sst2_grid.REUSED_FILE in line]
    assert len(reused) == len(methods) and all("/seed0 " in line for line in reused)
    assert f"# {len(lines)} cells; estimated" in out
    args = sst2_grid.parse(paper_argv(tmp_path, "--protocol", "paper"))
    assert args.select == "val/acc" and args.checkpoint == "final"  # appendix M: accuracy
    assert not (tmp_path / "grid").exists()  # a dry run writes nothing


def test_paper_configs_match_the_paper() -> None:
    """MC Dropout is DropKey with p = 0.2 (appendix T); Bayes-LoRA has the appendix W
    settings; LoRA methods rank 64, Xavier gain 10 (appendix M)."""
    configs = REPO / "configs" / "sst2_minilm"
    mc = load_composed(configs / "mc_dropout.yaml")["model"]["method"]
    assert mc["init_args"]["dropout"] == 0.2 and mc["init_args"].get("variant", "dropkey") == (
        "dropkey"
    )
    bayes = load_composed(configs / "bayes_lora.yaml")["model"]["method"]["init_args"]
    assert bayes["prior_variance"] == 1e-3 and bayes["n_kfac"] == 10
    assert bayes["lora"]["rank"] == 64
    assert sst2_paper.config_gain(configs) == 10.0
    for name in ("lora_ensemble", "single_lora"):
        lora = load_composed(configs / f"{name}.yaml")["model"]["method"]["init_args"]["lora"]
        assert lora == {"rank": 64, "gain": 10.0}


def test_gain_dry_run_reuses_the_grid_run_at_gain_10(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sst2_paper.main(["gain", "--grid", str(tmp_path / "grid"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = commands(out)
    assert len(lines) == 5 * 3
    for gain in (1, 4, 20, 40):
        with_gain = [c for c in lines if c.endswith(f"--model.method.init_args.lora.gain={gain}")]
        assert len(with_gain) == 3, gain
    own = [c for c in lines if "lora.gain" not in c]
    assert len(own) == 3  # gain 10: the grid's own LoRA-Ensemble cells
    assert f"{tmp_path / 'grid'}/runs/lora_ensemble/seed0 " in out
    assert all("/lora_ensemble.yaml" in c and "num_members=8" in c for c in lines)
    assert "# 12 cells; estimated" in out


def test_a_gain_cell_trains_in_full_even_at_the_search_seed(tmp_path: Path) -> None:
    """Only the grid's own seed-0 LoRA-Ensemble cell tests the search run; a gain cell of
    that seed trains from the start, so it is neither flagged nor estimated as test-only,
    and it never takes over the grid cell's reuse record."""
    grid = sst2_grid.parse(paper_argv(tmp_path, "--protocol", "paper"))
    own = sst2_paper.gain_cell(grid, 10.0, 0, 5e-5, 10.0)
    own.folder.mkdir(parents=True)
    (own.folder / sst2_grid.REUSED_FILE).write_text(json.dumps({"trained_in": "lr_search"}))
    own = sst2_paper.gain_cell(grid, 10.0, 0, 5e-5, 10.0)
    assert own.info["reuses_search"] and "training_reused" in own.info
    full = sst2_paper.gain_cell(grid, 10.0, 1, 5e-5, 10.0)  # another seed: full training
    for seed, reference in ((0, full), (1, full)):
        cell = sst2_paper.gain_cell(grid, 4.0, seed, 5e-5, 10.0)
        assert cell.folder == tmp_path / "grid" / "gain" / "g4" / f"seed{seed}"
        assert cell.info["stage"] == "gain" and cell.info["gain"] == 4.0
        assert "reuses_search" not in cell.info and "training_reused" not in cell.info
        assert cell.args[-1] == "--model.method.init_args.lora.gain=4"
        assert f"--seed_everything={seed}" in cell.args
        assert cell.estimate_seconds is not None and own.estimate_seconds is not None
        assert cell.estimate_seconds == reference.estimate_seconds > own.estimate_seconds


def test_a_shared_rate_method_trains_its_search_seed_in_full(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--share-lr explicit_ensemble=single_network``: the Explicit Ensemble has no search
    run of its own, so its seed-0 cell is neither labelled nor estimated as test-only (it was
    listed at 0.43 CPU-h instead of 2.48), while the Single Network's seed 0 still is."""
    argv = paper_argv(tmp_path, "--methods", "single_network", "explicit_ensemble")
    argv += ["--share-lr", "explicit_ensemble=single_network"]
    grid = sst2_grid.parse([*argv, "--protocol", "paper"])
    assert sst2_grid.reuses_search(grid, "single_network")
    assert not sst2_grid.reuses_search(grid, "explicit_ensemble")
    first = sst2_grid.test_cell(grid, "explicit_ensemble", 0, 5e-5)
    second = sst2_grid.test_cell(grid, "explicit_ensemble", 1, 5e-5)
    assert "reuses_search" not in first.info
    assert first.estimate_seconds is not None
    assert first.estimate_seconds == second.estimate_seconds
    assert sst2_grid.test_cell(grid, "single_network", 0, 5e-5).info["reuses_search"]
    assert sst2_paper.main(["grid", *argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if "tests the search run" in line]
    assert len(listed) == 1 and "/runs/single_network/seed0 " in listed[0]


def test_a_search_restored_without_its_checkpoint_trains_its_seed_in_full(tmp_path: Path) -> None:
    """A search finished on another machine and restored from its records (no ``last.ckpt``):
    the seed-0 cell trains in full, so it is neither flagged nor estimated as test-only (MC
    Dropout's seed 0 was listed at 0.51 CPU-h instead of 1.64). With the chosen run's
    checkpoint still there, or before the search has chosen, it is."""
    grid = sst2_grid.parse(paper_argv(tmp_path, "--protocol", "paper"))
    assert sst2_grid.test_cell(grid, "mc_dropout", 0, 5e-5).info["reuses_search"]  # not chosen
    search = tmp_path / "grid" / "lr_search" / "mc_dropout"
    search.mkdir(parents=True)
    (search / "selection.json").write_text(json.dumps({"lr": 5e-5}))
    first = sst2_grid.test_cell(grid, "mc_dropout", 0, 5e-5)
    second = sst2_grid.test_cell(grid, "mc_dropout", 1, 5e-5)
    assert "reuses_search" not in first.info
    assert first.estimate_seconds is not None
    assert first.estimate_seconds == second.estimate_seconds
    other = search / "lr7e-05" / "checkpoints" / "last.ckpt"  # not the chosen rate's
    other.parent.mkdir(parents=True)
    other.write_bytes(b"")
    assert "reuses_search" not in sst2_grid.test_cell(grid, "mc_dropout", 0, 5e-5).info
    chosen = search / "lr5e-05" / "checkpoints" / "last.ckpt"
    chosen.parent.mkdir(parents=True)
    chosen.write_bytes(b"")
    kept = sst2_grid.test_cell(grid, "mc_dropout", 0, 5e-5)
    assert kept.info["reuses_search"]
    assert kept.estimate_seconds is not None and kept.estimate_seconds < second.estimate_seconds


def test_the_sweep_record_is_written_first_and_merged_over_invocations(tmp_path: Path) -> None:
    """``gain/gain.json`` is written before any cell runs (a sweep stopped part-way is still
    in the results) and merges every invocation's gains, seeds and command; the grid's own
    gain (10) is always listed. Another rate is refused: its cells would not be one sweep."""
    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "grid.json").write_text(
        json.dumps({"argv": paper_argv(tmp_path, "--protocol", "paper")})
    )
    args = sst2_paper.grid_args(grid, dry_run=False)
    path = grid / "gain" / "gain.json"
    first = ["--grid", str(grid), "--gains", "1", "4", "--seeds", "0"]
    second = ["--grid", str(grid), "--gains", "40", "4", "--seeds", "2"]
    for argv in (first, second, first):
        options = sst2_paper._parser().parse_args(argv)
        args.seeds = options.seeds
        sst2_paper.record_sweep(options, args, argv, 7e-5, 10.0)
    record = json.loads(path.read_text())
    assert record["gains"] == [1.0, 4.0, 10.0, 40.0] and record["seeds"] == [0, 2]
    assert record["invocations"] == [first, second]
    assert record["folders"] == {
        "1": "gain/g1",
        "4": "gain/g4",
        "10": "runs/lora_ensemble",
        "40": "gain/g40",
    }
    with pytest.raises(SystemExit, match=r"lr=7e-05.*5e-05"):
        sst2_paper.record_sweep(sst2_paper._parser().parse_args(first), args, first, 5e-5, 10.0)
    assert json.loads(path.read_text()) == record


def test_every_cell_fits_two_hours_on_two_threads() -> None:
    argv = ["--protocol", "paper", "--data", "D", "--output", "/nonexistent/grid", "--threads"]
    cells = sst2_grid.plan([*argv, "2"])
    grid = sst2_grid.parse([*argv, "2"])
    cells += [sst2_paper.gain_cell(grid, g, s, 5e-5, 10.0) for g in (1.0, 40.0) for s in (0, 1)]
    assert len(cells) == 42 + 4
    speedup = estimate_cost.parallel_speedup(2)
    for cell in cells:
        assert cell.estimate_seconds is not None, cell.folder
        assert 0 < cell.estimate_seconds / speedup < TWO_HOURS, cell.folder
        assert cell.resume and cell.callbacks == runner.final_checkpoint_callbacks()
    # the largest cell (the Explicit Ensemble, M = 8) dominates; single networks are cheap
    by_method = {c.info["method"]: c.estimate_seconds for c in cells if c.info["stage"] == "test"}
    assert max(by_method, key=by_method.__getitem__) == "explicit_ensemble"
    assert by_method["bayes_lora"] < by_method["lora_ensemble"]
    table = estimate_cost.main(
        ["--from-records", str(estimate_cost.DEFAULT_RECORDS), "--threads", "2"]
    )
    assert table == 0


def test_record_rates_scale_per_member_and_precision(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "lora_ensemble" / "seed0"
    run.mkdir(parents=True)
    compute = {"train_seconds_per_epoch": 400.0, "inference_seconds_per_sample": 0.02}
    report = {"method": {"num_members": 4}, "compute": compute}
    (run / "metrics.json").write_text(json.dumps(report))
    (run / "run.json").write_text(json.dumps({"wall_seconds": 100.0, "cpu_seconds": 50.0}))
    rates = estimate_cost.record_rates(tmp_path)
    rate = rates["lora_ensemble"]
    assert rate.train == pytest.approx(400 * 0.5 / 4000 / 4)  # CPU share 0.5, per member
    assert rates["lora_ensemble_m8"].source == "lora_ensemble"
    one = estimate_cost.cell_seconds(
        rate, method="lora_ensemble", members=8, epochs=1, train_limit=4000, test=False,
        precision="bf16-mixed",
    )  # fmt: skip
    assert one["epoch"] == pytest.approx(400 * 0.5 * 2 + 0.02 * 0.5 * 2 * 1010)
    fp32 = estimate_cost.cell_seconds(
        rate, method="lora_ensemble", members=8, epochs=1, train_limit=4000, test=False
    )
    assert fp32["epoch"] == pytest.approx(one["epoch"] * estimate_cost.PRECISION_FACTOR["32"])


def fake_lorae(
    calls: list[list[str]], fail_first: bool = True
) -> Any:  # a stand-in for runner._run_lorae
    def run(args: list[str], log: Path, mode: str) -> int:
        calls.append(list(args))
        folder = log.parent
        log.write_text("fake")
        checkpoints = folder / "checkpoints"
        if fail_first and len(calls) == 1:  # epoch 1 done, then the machine stops
            checkpoints.mkdir(parents=True)
            (checkpoints / "last.ckpt").write_text("epoch 1")
            (folder / "epoch1.txt").write_text("trained")
            return 137
        assert (folder / "epoch1.txt").is_file()  # the first attempt's work is still there
        (folder / "metrics.json").write_text("{}")
        return 0

    return run


def test_resumable_cell_continues_from_its_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(runner, "_run_lorae", fake_lorae(calls))
    cell = Cell(
        tmp_path / "cell",
        ["fit", "--config", "x.yaml"],
        info={"method": "m"},
        callbacks=runner.final_checkpoint_callbacks(),
        resume=True,
        estimate_seconds=10.0,
    )
    first = run_cell(cell)
    assert first["returncode"] == 137 and not cell.done
    assert not any(a.startswith("--ckpt_path") for a in calls[0])
    second = run_cell(cell)  # the same command again: continues, does not restart
    assert second["returncode"] == 0 and cell.done
    last = cell.folder / "checkpoints" / "last.ckpt"
    assert calls[1][-1] == f"--ckpt_path={last}"
    assert calls[1][:-1] == calls[0]
    record = json.loads((cell.folder / "run.json").read_text())
    assert record["attempts"] == 2 and record["command"] == ["lorae", *calls[0]]
    attempts = json.loads((cell.folder / "attempts.json").read_text())
    assert record["wall_seconds"] == pytest.approx(sum(a["wall_seconds"] for a in attempts))
    assert record["estimate_seconds"] == 10.0
    loggers = (cell.folder / "loggers.yaml").read_text()
    assert "filename: last" in loggers and "save_top_k: 1" in loggers
    assert run_cell(cell)["skipped"] and len(calls) == 2  # done: skipped

    # A cell without resume starts over: its folder is deleted.
    calls.clear()
    plain = Cell(tmp_path / "plain", ["fit"])
    assert run_cell(plain)["returncode"] == 137
    with pytest.raises(AssertionError):  # the fake sees the first attempt's work gone
        run_cell(plain)


def test_cells_run_side_by_side_get_their_own_cpu_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two cells at once (`--jobs 2`): a sleeping child is charged no CPU, even when the busy
    one finishes first (the process-wide RUSAGE_CHILDREN would charge both to it)."""
    import stat
    import threading

    fake = tmp_path / "python"  # stands in for `python -m lorae ARGS`
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$3" = burn ]; then exec "$REAL_PYTHON" -c "import time\n'
        't = time.process_time()\nwhile time.process_time() - t < 1.0: pass"\n'
        "else sleep 3; fi\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("REAL_PYTHON", __import__("sys").executable)
    monkeypatch.setattr(runner.sys, "executable", str(fake))
    cells = {kind: Cell(tmp_path / kind, [kind], log_config=False) for kind in ("burn", "idle")}
    records: dict[str, dict[str, Any]] = {}

    def run(kind: str) -> None:
        records[kind] = run_cell(cells[kind])

    threads = [threading.Thread(target=run, args=(kind,)) for kind in cells]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert records["burn"]["cpu_seconds"] >= 0.9  # it burned a second of CPU
    assert records["idle"]["cpu_seconds"] < 0.5  # it slept; the burner's second is not its


def write_csv(folder: Path, rows: list[tuple[int, float, float]]) -> None:
    (folder / "csv").mkdir(parents=True, exist_ok=True)
    lines = ["epoch,step,train/loss,val/acc,val/nll"]
    for epoch, acc, nll in rows:
        lines += [f"{epoch},{epoch * 10},0.5,,", f"{epoch},{epoch * 10},,{acc},{nll}"]
    (folder / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_paper_search_picks_the_final_epochs_best_accuracy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each search run's final epoch gives its validation accuracy; the highest wins, even
    where an earlier epoch or another metric would say otherwise."""
    logs = {  # lr -> (epoch, val/acc, val/nll) rows
        "2e-05": [(0, 0.70, 0.50), (1, 0.80, 0.45), (2, 0.82, 0.44)],
        "5e-05": [(0, 0.90, 0.30), (1, 0.84, 0.35), (2, 0.85, 0.36)],  # best epoch is 0
        "7e-05": [(0, 0.60, 0.60), (1, 0.81, 0.29), (2, 0.83, 0.28)],  # best NLL
    }

    def fake(args: list[str], log: Path, mode: str) -> int:
        lr = next(a for a in args if a.startswith("--model.optimizer")).split("=")[1]
        assert "--test_after_fit=false" in args
        write_csv(log.parent, logs[f"{float(lr):.0e}"])
        (log.parent / "checkpoints").mkdir()
        (log.parent / "checkpoints" / "last.ckpt").write_text("x")
        return 0

    monkeypatch.setattr(runner, "_run_lorae", fake)
    args = sst2_grid.parse(paper_argv(tmp_path, "--protocol", "paper", "--methods", "single_lora"))
    args.output.mkdir(parents=True)
    choice = sst2_grid.search_method(args, "single_lora")
    assert choice is not None and choice["lr"] == 5e-5 and choice["selected_by"] == "val/acc"
    assert choice["value"] == 0.85
    assert choice["candidates"]["2e-05"]["checkpoint_epoch"] == 2.0
    assert not (args.output / "lr_search" / "single_lora" / "lr5e-05" / "checkpoints").exists()
    assert "chose lr=5e-05" in capsys.readouterr().out


def test_jobs_run_one_methods_search_cells_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--jobs 2` keeps two cells going also when one method is left: its search cells run
    in pairs (each fake run waits at a barrier for a partner), and its choice still follows."""
    import threading

    barrier = threading.Barrier(2, timeout=20)
    accs = {"2e-05": 0.7, "5e-05": 0.9, "7e-05": 0.8, "1e-04": 0.6}

    def fake(args: list[str], log: Path, mode: str) -> int:
        barrier.wait()  # BrokenBarrierError when no second cell runs alongside
        lr = next(a for a in args if a.startswith("--model.optimizer")).split("=")[1]
        write_csv(log.parent, [(0, accs[f"{float(lr):.0e}"], 0.5)])
        return 0

    monkeypatch.setattr(runner, "_run_lorae", fake)
    argv = paper_argv(tmp_path, "--protocol", "paper", "--methods", "single_lora", "--jobs", "2")
    args = sst2_grid.parse([*argv, "--lrs", "2e-5", "5e-5", "7e-5", "1e-4"])
    args.output.mkdir(parents=True)
    choices = sst2_grid.search(args, ["single_lora"])
    assert choices["single_lora"] is not None and choices["single_lora"]["lr"] == 5e-5
    assert set(choices["single_lora"]["candidates"]) == {"2e-05", "5e-05", "7e-05", "0.0001"}


def test_jobs_run_one_methods_seeds_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--jobs 2` in stage 2 with one method left: its seeds run in pairs (each fake run waits
    at a barrier for a partner; one after another they would break it), every seed once."""
    import threading

    barrier = threading.Barrier(2, timeout=20)
    seeds: list[str] = []

    def fake(args: list[str], log: Path, mode: str) -> int:
        barrier.wait()  # BrokenBarrierError when no second cell runs alongside
        seeds.append(next(a for a in args if a.startswith("--seed_everything=")))
        return 0

    monkeypatch.setattr(runner, "_run_lorae", fake)
    argv = paper_argv(tmp_path, "--protocol", "paper", "--methods", "single_lora", "--jobs", "2")
    argv += ["--method-lr", "single_lora=5e-5", "--seeds", "1", "2", "3", "4"]
    assert sst2_grid.main(argv) == 0
    assert sorted(seeds) == [f"--seed_everything={s}" for s in (1, 2, 3, 4)]
    out = capsys.readouterr().out
    for seed in (1, 2, 3, 4):
        assert f"[test] single_lora seed {seed} lr=5e-05: " in out


def fake_paper_grid(folder: Path, accs: dict[float, list[float]]) -> None:
    """A finished paper grid with a gain sweep: LoRA-Ensemble at gain 10 in runs/, the other
    gains in gain/g<G>/; Single LoRA in runs/ too."""
    argv = ["--data", "/d", "--output", str(folder), "--jobs", "2"]
    grid = {"protocol": "paper", "argv": ["--protocol", "paper", *argv], "data": "/d"}
    grid["seeds"] = [0, 1, 2]  # the fake runs have seeds 0 and 1: a grid still running
    grid["invocations"] = [grid["argv"], [*grid["argv"], "--methods", "lora_ensemble"]]
    folder.mkdir(parents=True)
    (folder / "grid.json").write_text(json.dumps(grid))
    selection = {"lr": 5e-5, "selected_by": "val/acc", "seed": 0}
    selection["candidates"] = {"2e-05": {"val/acc": 0.8}, "5e-05": {"val/acc": 0.85}}
    (folder / "lr_selection.json").write_text(json.dumps({"lora_ensemble": selection}))
    folders = {}
    for gain, values in accs.items():
        base = folder / ("runs/lora_ensemble" if gain == 10 else f"gain/g{gain:g}")
        folders[f"{gain:g}"] = base.relative_to(folder).as_posix()
        for seed, acc in enumerate(values):
            run = base / f"seed{seed}"
            run.mkdir(parents=True)
            metrics = {"test/acc": acc, "test/ece": 0.05, "test/nll": 0.3 + seed / 100}
            metrics["test/diversity/disagreement"] = 0.01 * gain
            report = {"metrics": metrics, "method": {"num_members": 8}, "compute": {}}
            (run / "metrics.json").write_text(json.dumps(report))
            command = ["lorae", "fit", f"--seed_everything={seed}", f"--gain={gain:g}"]
            record = {"stage": "test", "lr": 5e-5, "seed": seed, "command": command}
            record |= {"wall_seconds": 100.0 + seed, "cpu_seconds": 90.0, "attempts": 2}
            (run / "run.json").write_text(json.dumps(record))
            diversity = {"diversity_score_v": gain / 50 + seed / 1000}
            if gain != 1.0:  # gain 1: analysed before the W_i reading was recorded
                diversity["diversity_score_v_weights"] = gain / 100 + seed / 1000
            (run / "weight_diversity.json").write_text(json.dumps(diversity))
            (run / "analysis").mkdir()
            (run / "analysis" / "analysis.json").write_text("{}")
    search = folder / "lr_search" / "lora_ensemble" / "lr5e-05"
    search.mkdir(parents=True)
    (search / "run.json").write_text(
        json.dumps({"lr": 5e-5, "wall_seconds": 50.0, "cpu_seconds": 40.0, "threads": "1"})
    )
    sweep = {"gains": list(accs), "config_gain": 10.0, "lr": 5e-5, "folders": folders}
    sweep["argv"] = ["--grid", str(folder)]
    (folder / "gain").mkdir(exist_ok=True)
    (folder / "gain" / "gain.json").write_text(json.dumps(sweep))


def test_results_doc_has_the_paper_tables_gain_figure_and_cost(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paper = tmp_path / "paper"
    accs = {1.0: [0.80, 0.82], 10.0: [0.85, 0.86], 40.0: [0.83, 0.81]}
    fake_paper_grid(paper, accs)
    doc = tmp_path / "docs" / "results.md"
    none = str(tmp_path / "none")
    args = ["--sst2", none, "--cifar10", none, "--cifar10-device", none, "--fsdd", none]
    args += ["--sst2-paper", str(paper), "--output", str(doc)]
    args += ["--discussion", str(tmp_path / "missing.md")]
    assert make_results.main(args) == 0
    text = doc.read_text()
    part = compare_rerun.section(text, make_results.PAPER_HEADING)
    assert part and "Comparison with the paper (Tab. 8, Tab. 11 and Tab. 16)" in text
    assert "python experiments/sst2_paper.py grid --data /d --output" in part
    assert "--jobs 2 --methods lora_ensemble\n" in part  # every session's command
    assert "**Partial grid:** 1 of 7 methods have tested runs so far; not yet run: " in part
    assert "single_network, single_lora, mc_dropout, explicit_ensemble, batch_ensemble," in part
    assert "; fewer seeds than the grid's (0,1,2) so far: lora_ensemble (0,1)." in part
    assert f"python experiments/sst2_paper.py gain --grid {paper}" in part
    # Tab. 8-like: one row per method with mean ± std over its seeds
    row = next(line for line in part.splitlines() if line.startswith("| lora_ensemble | 0,1 |"))
    assert f"{statistics.fmean(accs[10.0]):.4f} ± {statistics.stdev(accs[10.0]):.4f}" in row
    # the exact command of every run
    assert "lorae fit --seed_everything=1 --gain=10" in part
    # the gain table: diversity score (App. E) against accuracy, ECE, NLL
    for gain, values in accs.items():
        line = next(x for x in part.splitlines() if x.startswith(f"| {gain:g} | 0,1 |"))
        diversity = [gain / 50, gain / 50 + 0.001]
        assert f"{statistics.fmean(diversity):.4f} ± {statistics.stdev(diversity):.4f}" in line
        of_weights = [gain / 100, gain / 100 + 0.001]
        expected = f"{statistics.fmean(of_weights):.4f} ± {statistics.stdev(of_weights):.4f}"
        assert (" n/a |" if gain == 1.0 else expected) in line
        assert f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}" in line
    figure = doc.parent / "figures" / "results" / make_results.GAIN_FIGURE
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert f"figures/results/{make_results.GAIN_FIGURE}" in part
    # the cost table: wall and CPU seconds of every cell, attempts counted
    assert "| runs/lora_ensemble/seed1 | 5e-05 | n/a | 2 | 101 | 90 | n/a |" in part
    assert "| lr_search/lora_ensemble/lr5e-05 | 5e-05 | 1 | 1 | 50 | 40 | n/a |" in part
    assert "**all 7 cells**" in part

    # compare_rerun: the same records are identical, a changed seed is found
    out = tmp_path / "reproducibility.md"
    compare_args = ["--sst2-paper", str(paper), "--reference", str(doc), "--output", str(out)]
    assert compare_rerun.main(compare_args) == 0
    report = out.read_text()
    assert "| sst2_paper | lora_ensemble | 0,1 | identical |" in report
    assert "| sst2_gain | 40 | 0,1 | identical |" in report
    assert "**4 of 4 rows are identical.**" in report
    changed = paper / "gain" / "g40" / "seed1" / "weight_diversity.json"
    original = changed.read_text()
    changed.write_text(json.dumps({"diversity_score_v": 0.9}))
    assert compare_rerun.main(compare_args) == 1
    assert "| sst2_gain | 40 | 0,1 | differs |" in out.read_text()
    changed.write_text(original)

    # kept records regenerate the same document; lorae analyze's folder is not kept
    records = tmp_path / "records"
    assert keep_records.main([str(paper), str(records)]) == 0
    kept = {p.relative_to(records).as_posix() for p in records.rglob("*") if p.is_file()}
    assert "gain/gain.json" in kept and "gain/g1/seed0/weight_diversity.json" in kept
    assert not any("analysis/" in k for k in kept)
    again = tmp_path / "again" / "results.md"
    assert make_results.main([*args, "--sst2-paper", str(records), "--output", str(again)]) == 0
    regenerated = again.read_text().replace(str(records), str(paper))  # gain/grid argv: paper's
    assert regenerated == text


def test_old_documents_have_no_paper_section(tmp_path: Path) -> None:
    """Without paper-protocol runs, the document is what it was (docs/results.md stays
    reproducible from the 2026-11-27 records)."""
    none = tmp_path / "none"
    text = make_results.render(none, none, none, tmp_path / "r.md", none, none, none)
    assert make_results.PAPER_HEADING not in text
    assert "## Comparison with the paper (Tab. 8 and Tab. 16)" in text


def tiny_sst2(tmp_path: Path) -> tuple[Path, list[str]]:
    """A 24-sentence SST-2, 6 AG News texts and a tiny BERT: the data folder and the
    ``--override`` items that swap the tiny model in."""
    from tests.experiments.test_experiments import tiny_text_overrides
    from tests.fixtures.builders import glue_sentences, write_glue_tsv, write_tiny_tokenizer

    data = tmp_path / "data"
    write_glue_tsv(data / "sst2", n_train=24, n_dev=20)
    (data / "agnews").mkdir()
    (data / "agnews" / "dev.tsv").write_text(
        "".join(f"{s}\tWorld\n" for s in glue_sentences(6, seed=7)), encoding="utf-8"
    )
    return data, tiny_text_overrides(write_tiny_tokenizer(tmp_path / "tokenizer"))


def test_interrupted_paper_cell_resumes_through_the_real_cli(tmp_path: Path) -> None:
    """A tiny BERT through the real `lorae fit`: a tested cell whose metrics are gone but
    whose last.ckpt (after epoch 1) remains continues from it for its second epoch."""
    data, overrides = tiny_sst2(tmp_path)
    argv = ["--protocol", "paper", "--data", str(data), "--output", str(tmp_path / "grid")]
    argv += ["--methods", "single_lora", "--lrs", "0.002", "--seeds", "0", "--train-limit", "24"]
    argv += ["--mode", "in-process", "--keep-checkpoints", "--ood-limit", "6"]
    argv += ["--retrain-lr-seed", "--override", *overrides]
    assert sst2_grid.main([*argv, "--epochs", "1"]) == 0
    run = tmp_path / "grid" / "runs" / "single_lora" / "seed0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    (run / "metrics.json").unlink()  # as if stopped after epoch 1 of 2
    assert sst2_grid.main([*argv, "--epochs", "2"]) == 0
    attempts = json.loads((run / "attempts.json").read_text())
    assert len(attempts) == 2 and attempts[1]["returncode"] == 0
    assert attempts[1]["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert attempts[1]["command"][-1].startswith("--ckpt_path=")
    epochs = [
        row["epoch"]
        for row in __import__("csv").DictReader((run / "csv" / "metrics.csv").open())
        if row.get("val/acc")
    ]
    assert [int(e) for e in epochs] == [0, 1]  # epoch 0 from the first attempt, 1 resumed
    assert "test/acc" in json.loads((run / "metrics.json").read_text())["metrics"]


def test_lr_seeds_tested_run_is_the_search_run_tested(tmp_path: Path) -> None:
    """Seed 0's tested run reuses the search run at the chosen rate (its last.ckpt, then only
    `lorae test`), and gives the same test metrics as training seed 0 again."""
    data, overrides = tiny_sst2(tmp_path)
    argv = ["--protocol", "paper", "--data", str(data), "--methods", "single_lora"]
    argv += ["--lrs", "0.002", "0.004", "--seeds", "0", "--train-limit", "24", "--epochs", "2"]
    argv += ["--mode", "in-process", "--ood-limit", "6"]
    argv += ["--override", *overrides]
    reused, again = tmp_path / "reused", tmp_path / "again"
    assert sst2_grid.main([*argv, "--output", str(reused)]) == 0
    assert sst2_grid.main([*argv, "--output", str(again), "--retrain-lr-seed"]) == 0

    chosen = json.loads((reused / "lr_selection.json").read_text())["single_lora"]["lr"]
    run = reused / "runs" / "single_lora" / "seed0"
    record = json.loads((run / sst2_grid.REUSED_FILE).read_text())
    assert record["trained_in"] == f"lr_search/single_lora/{runner.lr_label(chosen)}"
    assert record["wall_seconds"] > 0
    attempts = json.loads((run / "attempts.json").read_text())
    assert len(attempts) == 1 and attempts[0]["resumed_from"].endswith("last.ckpt")
    assert json.loads((run / "run.json").read_text())["training_reused"] == record
    commands = make_results.commands_block(make_results.load_runs(reused))
    assert f"# trained in {record['trained_in']} (the same command with" in commands
    # nothing left behind: the checkpoints moved or were removed
    assert not list((reused / "lr_search").rglob("*.ckpt"))
    assert not list(run.rglob("*.ckpt"))
    assert not (again / "runs" / "single_lora" / "seed0" / sst2_grid.REUSED_FILE).exists()
    # the tested cell's log holds the search run's epochs, then the test
    rows = list(__import__("csv").DictReader((run / "csv" / "metrics.csv").open()))
    assert [int(float(r["epoch"])) for r in rows if r.get("val/acc")] == [0, 1]
    assert any(r.get("test/acc") for r in rows)

    def test_metrics(folder: Path) -> dict[str, float]:
        metrics = json.loads((folder / "runs/single_lora/seed0/metrics.json").read_text())
        return {k: v for k, v in metrics["metrics"].items() if k.startswith("test/")}

    # a second session's command (everything done: skipped) is recorded next to the first
    assert sst2_grid.main([*argv, "--output", str(reused)]) == 0
    assert sst2_grid.main([*argv, "--output", str(reused), "--jobs", "1"]) == 0
    invocations = json.loads((reused / "grid.json").read_text())["invocations"]
    assert invocations == [
        [*argv, "--output", str(reused)],
        [*argv, "--output", str(reused), "--jobs", "1"],
    ]
    first, second = test_metrics(reused), test_metrics(again)
    assert first and first.keys() == second.keys()
    for key in first:
        assert first[key] == pytest.approx(second[key], rel=1e-6, abs=1e-9), key


def test_keep_earlier_sections_adds_the_new_ones(tmp_path: Path) -> None:
    """--keep-earlier-sections keeps what comes before the issue 18 sections byte for byte,
    inserts the paper-protocol section, rewrites the discussion, and is idempotent."""
    pytest.importorskip("matplotlib")
    paper = tmp_path / "paper"
    fake_paper_grid(paper, {10.0: [0.85, 0.86], 1.0: [0.80, 0.82]})
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    earlier = "# Results\n\n## SST-2 dev grid\n\n| a | row from lost runs |\n"
    doc.write_text(
        f"{earlier}\n## Comparison with the paper (Tab. 8 and Tab. 16)\n"
        f"{make_results.DISCUSSION_MARKER}\nOld discussion.\n"
    )
    discussion = tmp_path / "discussion.md"
    discussion.write_text("New discussion.")
    none = str(tmp_path / "none")
    args = ["--sst2", none, "--cifar10", none, "--cifar10-device", none, "--fsdd", none]
    args += ["--sst2-paper", str(paper), "--output", str(doc), "--discussion", str(discussion)]
    args += ["--keep-earlier-sections"]
    assert make_results.main(args) == 0
    text = doc.read_text()
    assert text.startswith(earlier)
    assert text.index(make_results.PAPER_HEADING) > len(earlier)
    assert "## Comparison with the paper (Tab. 8, Tab. 11 and Tab. 16)" in text
    assert text.endswith("New discussion.\n") and "Old discussion" not in text
    assert make_results.main(args) == 0
    assert doc.read_text() == text
    with pytest.raises(SystemExit, match="no comparison section"):
        make_results.earlier_sections("# a document without the sections\n")


def test_gain_cell_says_over_how_many_seeds_a_partial_reading_is() -> None:
    """Seeds 1 and 2 record the W_i reading, seed 0 (analysed earlier) does not: the cell is
    their mean and says so, and a reading every seed has gets no such note."""
    nan = math.nan
    assert make_results.mean_std([nan, 0.03, 0.05]) == "0.0400 ± 0.0141 (2 of 3 seeds)"
    assert make_results.mean_std([nan, 0.03]) == "0.0300 (1 of 2 seeds)"
    assert make_results.mean_std([0.03, 0.05]) == "0.0400 ± 0.0141"
    assert make_results.mean_std([nan, nan]) == "n/a"


def test_cost_rows_put_gain_cells_in_numeric_order(tmp_path: Path) -> None:
    for gain in (1, 20, 4, 40):
        cell = tmp_path / "gain" / f"g{gain}" / "seed0"
        cell.mkdir(parents=True)
        (cell / "run.json").write_text(json.dumps({"wall_seconds": 1.0, "cpu_seconds": 1.0}))
    cells = [row["cell"] for row in make_results.cost_rows(tmp_path)]
    assert cells == [f"gain/g{gain}/seed0" for gain in (1, 4, 20, 40)]


def test_grid_passes_a_redundant_paper_protocol_once_and_refuses_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(sst2_grid, "main", lambda argv: seen.append(argv) or 0)
    argv = paper_argv(tmp_path, "--methods", "single_network")
    assert sst2_paper.main(["grid", "--protocol", "paper", *argv]) == 0
    assert sst2_paper.main(["grid", "--protocol=paper", *argv]) == 0
    assert seen == [["--protocol", "paper", *argv]] * 2  # recorded in grid.json once, not twice
    with pytest.raises(SystemExit, match="always runs --protocol paper, got --protocol 'dev'"):
        sst2_paper.main(["grid", "--protocol=dev", *argv])
    assert len(seen) == 2
