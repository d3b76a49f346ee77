"""Every subcommand's error path (issue 19): a missing file, an unreadable file and a folder that
cannot be created each end with exit code 2 and one ``lorae: error:`` line naming the path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from lorae.cli import main
from tests.fixtures.tiny_configs import checkpoint_callback, digits_lora_config, write_config

Case = Callable[[Path, "Files"], list[str]]


class Files:
    """A trained tiny checkpoint, its config, a garbage file and a regular file in the way."""

    def __init__(self, root: Path) -> None:
        settings = digits_lora_config()
        settings["trainer"]["callbacks"] = [checkpoint_callback(root / "ckpt")]
        self.config = write_config(root / "config.yaml", settings)
        main(
            [
                "fit",
                "--config",
                str(self.config),
                "--trainer.max_steps=2",
                "--trainer.limit_val_batches=1",
                f"--trainer.default_root_dir={root / 'run'}",
            ]
        )
        self.checkpoint = root / "ckpt" / "last.ckpt"
        assert self.checkpoint.is_file()
        test = ["test", "--config", str(self.config), "--ckpt_path", str(self.checkpoint)]
        main(
            [*test, "--trainer.limit_test_batches=1", f"--trainer.default_root_dir={root / 'run'}"]
        )
        self.metrics = next((root / "run").rglob("metrics.json"))
        self.garbage = root / "garbage.bin"
        self.garbage.write_bytes(b"\x00\x01 this is not a checkpoint, a config or metrics \xff")
        self.blocker = root / "a_regular_file"
        self.blocker.write_text("not a folder")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("error_paths"))


def _lightning(subcommand: str) -> dict[str, Case]:
    def missing(tmp: Path, f: Files) -> list[str]:
        return [subcommand, "--config", str(f.config), "--ckpt_path", str(tmp / "no.ckpt"),
                f"--trainer.default_root_dir={tmp / 'run'}"]  # fmt: skip

    def unreadable(tmp: Path, f: Files) -> list[str]:
        return [subcommand, "--config", str(f.config), "--ckpt_path", str(f.garbage),
                f"--trainer.default_root_dir={tmp / 'run'}"]  # fmt: skip

    def uncreatable(tmp: Path, f: Files) -> list[str]:
        return [
            subcommand,
            "--config",
            str(f.config),
            "--ckpt_path",
            str(f.checkpoint),
            f"--trainer.default_root_dir={f.blocker / 'runs'}",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--trainer.limit_predict_batches=1",
        ]

    return {"missing": missing, "unreadable": unreadable, "uncreatable": uncreatable}


def _fit() -> dict[str, Case]:
    def missing(tmp: Path, f: Files) -> list[str]:
        return ["fit", "--config", str(f.config), "--ckpt_path", str(tmp / "no.ckpt"),
                f"--trainer.default_root_dir={tmp / 'run'}"]  # fmt: skip

    def unreadable(tmp: Path, f: Files) -> list[str]:
        return ["fit", "--config", str(f.config), "--ckpt_path", str(f.garbage),
                f"--trainer.default_root_dir={tmp / 'run'}"]  # fmt: skip

    def uncreatable(tmp: Path, f: Files) -> list[str]:
        return [
            "fit",
            "--config",
            str(f.config),
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={f.blocker / 'runs'}",
        ]

    return {"missing": missing, "unreadable": unreadable, "uncreatable": uncreatable}


def _analyze() -> dict[str, Case]:
    def args(ckpt: Path, out: Path, f: Files) -> list[str]:
        return ["analyze", "--config", str(f.config), "--ckpt_path", str(ckpt),
                "--output_dir", str(out), "--max_samples", "32", "--plots", "false"]  # fmt: skip

    return {
        "missing": lambda tmp, f: args(tmp / "no.ckpt", tmp / "out", f),
        "unreadable": lambda tmp, f: args(f.garbage, tmp / "out", f),
        "uncreatable": lambda tmp, f: args(f.checkpoint, f.blocker / "out", f),
    }


def _aggregate() -> dict[str, Case]:
    def uncreatable(tmp: Path, f: Files) -> list[str]:
        return ["aggregate", str(f.metrics), "--output", str(f.blocker / "out" / "table")]

    return {
        "missing": lambda tmp, f: ["aggregate", str(tmp / "no_runs")],
        "unreadable": lambda tmp, f: ["aggregate", str(_as_metrics(tmp, f))],
        "uncreatable": uncreatable,
    }


def _as_metrics(tmp: Path, f: Files) -> Path:
    path = tmp / "metrics.json"
    path.write_bytes(f.garbage.read_bytes())
    return path


def _crossval() -> dict[str, Case]:
    return {
        "missing": lambda tmp, f: ["crossval", "--config", str(tmp / "no.yaml")],
        "unreadable": lambda tmp, f: ["crossval", "--config", str(f.garbage)],
        "uncreatable": lambda tmp, f: [
            "crossval",
            "--config",
            str(f.config),
            "--output",
            str(f.blocker / "folds"),
        ],
    }


def _export() -> dict[str, Case]:
    def args(ckpt: Path, out: Path) -> list[str]:
        return ["export", "--ckpt_path", str(ckpt), "--output", str(out)]

    return {
        "missing": lambda tmp, f: args(tmp / "no.ckpt", tmp / "a.safetensors"),
        "unreadable": lambda tmp, f: args(f.garbage, tmp / "a.safetensors"),
        "uncreatable": lambda tmp, f: args(f.checkpoint, f.blocker / "a.safetensors"),
    }


CASES: dict[str, dict[str, Case]] = {
    "fit": _fit(),
    **{name: _lightning(name) for name in ("validate", "test", "predict")},
    "analyze": _analyze(),
    "aggregate": _aggregate(),
    "crossval": _crossval(),
    "export": _export(),
}


def _named_path(case: str, args: list[str], tmp: Path, f: Files) -> str:
    """The path the message must name."""
    if case == "uncreatable":
        return str(f.blocker)
    if case == "unreadable":
        return next(a for a in args if a.endswith(("garbage.bin", "metrics.json")))
    return next(a for a in args if a.startswith(str(tmp)))


@pytest.mark.parametrize("case", ["missing", "unreadable", "uncreatable"])
@pytest.mark.parametrize("subcommand", list(CASES))
def test_each_subcommand_fails_with_one_line_naming_the_path(
    subcommand: str, case: str, files: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = CASES[subcommand][case](tmp_path, files)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("lorae: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert _named_path(case, args, tmp_path, files) in errors[0], errors[0]
    if case != "uncreatable":  # a run refused for its input writes nothing
        assert not list((tmp_path / "run").rglob("*")), "a refused run wrote files"
