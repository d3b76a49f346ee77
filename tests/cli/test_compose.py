"""``base:`` composition of config files (lorae.cli.compose) and the CLI running it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorae.cli import main
from lorae.cli.compose import expand_config_args, load_composed, merge
from lorae.errors import ConfigError
from tests.fixtures.tiny_configs import digits_lora_config, write_config


def test_merge_is_recursive_for_mappings_only() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert merge(base, {"a": {"c": [3]}, "e": 2}) == {"a": {"b": 1, "c": [3]}, "d": 1, "e": 2}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # not modified
    merged = merge({"init_args": {"x": 1}}, {"class_path": "m.C"})
    assert list(merged) == ["class_path", "init_args"]  # jsonargparse reads class_path first


def test_bases_in_order_relative_to_the_including_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("x: 1\ny: {p: 1, q: 1}\n")
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\ny: {q: 2}\n")
    (tmp_path / "c.yaml").write_text("x: 3\n")
    (tmp_path / "sub" / "top.yaml").write_text("base: [b.yaml, ../c.yaml]\nz: 0\n")
    assert load_composed(tmp_path / "sub" / "top.yaml") == {"x": 3, "y": {"p": 1, "q": 2}, "z": 0}


def test_cycle_and_missing_base_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_composed(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml"):
        load_composed(tmp_path / "c.yaml")


def test_expand_only_touches_files_with_a_base(tmp_path: Path) -> None:
    plain = tmp_path / "plain.yaml"
    plain.write_text("x: 1\n")
    composed = tmp_path / "top.yaml"
    composed.write_text("base: plain.yaml\ny: 2\n")
    args = ["fit", "--config", str(plain), "-c", str(composed), f"--config={composed}", "--y=3"]
    out = expand_config_args(args)
    assert out[:3] == ["fit", "--config", str(plain)]
    assert yaml.safe_load(out[4]) == {"x": 1, "y": 2}
    assert out[5].startswith("--config=") and yaml.safe_load(out[5][9:]) == {"x": 1, "y": 2}
    assert out[6] == "--y=3"
    assert expand_config_args(out) == out  # YAML text is passed through


def test_fit_with_a_composed_config_saves_the_resolved_one(tmp_path: Path) -> None:
    config = digits_lora_config(num_members=2)
    method = config["model"].pop("method")
    base = write_config(tmp_path / "base.yaml", config)
    top = tmp_path / "method.yaml"
    top.write_text(yaml.safe_dump({"base": base.name, "model": {"method": method}}))
    main(
        [
            "fit",
            "--config",
            str(top),
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--test_after_fit=false",
            "--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        ]
    )
    saved = next((tmp_path / "logs").rglob("config.yaml"))
    resolved = yaml.safe_load(saved.read_text())
    assert "base" not in resolved
    assert resolved["model"]["method"]["init_args"]["num_members"] == 2
    assert resolved["model"]["method"]["class_path"] == method["class_path"]
