"""The shipped configs against the paper and against themselves.

- ``docs/recipes.md`` is exactly what ``scripts/make_recipes.py`` generates, and no resolved
  config differs from the paper's value (``docs/recipes/paper.yaml``) without a listed deviation.
- Composition: a method file sets only its method, plus the keys its data set lists under
  ``fragments_may_set``; it never repeats a value of its base.
- Both checks fail on a config edited to break them (tests below edit copies in tmp_path).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorae.cli.compose import BASE_KEY, base_paths, load_composed, merge
from scripts import make_recipes

REPO = Path(__file__).resolve().parents[1]
PAPER = make_recipes.load_paper()
#: Keys under model.method that are the data set's recipe, not the method's.
BASE_FACTS_UNDER_METHOD = ("backbone", "pretrained", "backbone_overrides")


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: config}


def composition_errors(path: Path, may_set: dict[str, str]) -> list[str]:
    """What ``path`` (a method file) repeats or contradicts of its base."""
    own = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    bases = base_paths(path, own)
    if not bases:
        return [f"{path}: no '{BASE_KEY}:'; every experiment file names its data set's base"]
    base: dict[str, Any] = {}
    for each in bases:
        base = merge(base, load_composed(each))
    inherited = _flatten(base)
    errors = []
    for key, value in _flatten({k: v for k, v in own.items() if k != BASE_KEY}).items():
        method_own = key.startswith("model.method.") and not any(
            key.startswith(f"model.method.init_args.{fact}") for fact in BASE_FACTS_UNDER_METHOD
        )
        if key in inherited and inherited[key] == value:
            errors.append(f"{path.name}: repeats the base's {key} = {value!r}")
        elif not method_own and key not in may_set:
            was = inherited.get(key, "(not in the base)")
            errors.append(
                f"{path.name}: sets {key} = {value!r} (base: {was!r}); only its method, or a "
                "key listed under fragments_may_set in docs/recipes/paper.yaml"
            )
    return errors


def _datasets() -> list[tuple[str, Path]]:
    folders = [(name, REPO / spec["folder"]) for name, spec in PAPER["datasets"].items()]
    return [
        (f"{name}/{make_recipes.config_name(p, folder)}", p)
        for name, folder in folders
        for p in make_recipes.experiment_configs(folder)
    ]


@pytest.fixture(scope="module")
def generated() -> tuple[str, list[str]]:
    return make_recipes.build(PAPER)


def test_every_dataset_folder_is_in_the_recipe_data() -> None:
    listed = {Path(spec["folder"]).name for spec in PAPER["datasets"].values()}
    folders = {p.name for p in (REPO / "configs").iterdir() if (p / "base.yaml").is_file()}
    assert folders == listed


def test_recipes_doc_is_generated(generated: tuple[str, list[str]]) -> None:
    text, _ = generated
    assert (REPO / "docs" / "recipes.md").read_text(encoding="utf-8") == text, (
        "docs/recipes.md is stale: run python scripts/make_recipes.py"
    )


def test_no_unexplained_deviation(generated: tuple[str, list[str]]) -> None:
    _, failures = generated
    assert failures == []


@pytest.mark.parametrize("name,path", _datasets(), ids=[n for n, _ in _datasets()])
def test_method_file_sets_only_its_method(name: str, path: Path) -> None:
    may_set = PAPER["datasets"][name.split("/")[0]].get("fragments_may_set") or {}
    assert composition_errors(path, may_set) == []


def _copy_configs(tmp_path: Path, dataset: str) -> Path:
    shutil.copytree(REPO / "configs" / dataset, tmp_path / "configs" / dataset)
    return tmp_path


def test_recipe_check_fails_on_an_edited_base(tmp_path: Path) -> None:
    repo = _copy_configs(tmp_path, "inat2017")
    base = repo / "configs" / "inat2017" / "base.yaml"
    base.write_text(base.read_text().replace("max_epochs: 64", "max_epochs: 32"))
    paper = {"datasets": {"inat2017": PAPER["datasets"]["inat2017"]}}
    _, failures = make_recipes.build(paper, repo=repo)
    assert failures and all("epochs (trainer.max_epochs) is 32" in f for f in failures)
    assert len(failures) == 4  # every method file of the data set inherits the edit


def test_recipe_check_fails_on_an_edited_method_file(tmp_path: Path) -> None:
    repo = _copy_configs(tmp_path, "esc50")
    method = repo / "configs" / "esc50" / "lora_ensemble.yaml"
    method.write_text(method.read_text().replace("num_members: 8", "num_members: 16"))
    paper = {"datasets": {"esc50": PAPER["datasets"]["esc50"]}}
    _, failures = make_recipes.build(paper, repo=repo)
    assert failures == [
        "esc50/lora_ensemble: ensemble members (model.method.init_args.num_members) is 16, the "
        "paper's is 8 and no deviation is listed"
    ]


def test_listed_deviation_needs_its_exact_value() -> None:
    setting = {
        "name": "augmentation",
        "key": "data.init_args.augment",
        "paper": "rotations only",
        "deviations": {"*": {"value": True, "reason": "the reference code's"}},
    }
    entries, failures = make_recipes.check_setting(
        setting, {"a": {"data": {"init_args": {"augment": True}}}}
    )
    assert failures == [] and entries[0]["status"] == "deviation"
    _, failures = make_recipes.check_setting(
        setting, {"a": {"data": {"init_args": {"augment": False}}}}
    )
    assert len(failures) == 1


def test_composition_check_fails_on_a_repeat_and_a_contradiction(tmp_path: Path) -> None:
    folder = _copy_configs(tmp_path, "cifar100") / "configs" / "cifar100"
    method = folder / "lora_ensemble.yaml"
    text = method.read_text()
    method.write_text(text + "trainer:\n  max_epochs: 16\n")  # repeats the base
    assert composition_errors(method, {}) == [
        "lora_ensemble.yaml: repeats the base's trainer.max_epochs = 16"
    ]
    method.write_text(text + "trainer:\n  max_epochs: 20\n")  # contradicts the base
    errors = composition_errors(method, {})
    assert len(errors) == 1 and "sets trainer.max_epochs = 20 (base: 16)" in errors[0]
    assert composition_errors(method, {"trainer.max_epochs": "a listed reason"}) == []
    method.write_text(text.replace("num_members: 16", "num_members: 16, backbone: vit_b_16"))
    assert "model.method.init_args.backbone" in composition_errors(method, {})[0]
    method.write_text("model:\n  method:\n    class_path: lorae.methods.SingleNetwork\n")
    assert "no 'base:'" in composition_errors(method, {})[0]


BAYES_CONFIGS = sorted(Path("configs").glob("*/bayes_lora.yaml"))


@pytest.mark.parametrize("path", BAYES_CONFIGS, ids=str)
def test_bayes_lora_configs_follow_appendix_w(path: Path) -> None:
    """Appendix W: "we follow the standard LoRA setup [...] The prior variance is chosen as
    10^-3 [...] the number of posterior samples [...] is fixed at 512 [...] n_kfac = 10":
    the MAP LoRA starts from PEFT's default init, not LoRA-Ensemble's Xavier gain 10."""
    init_args = load_composed(path)["model"]["method"]["init_args"]
    assert init_args["lora"]["init"] == "kaiming_uniform"
    assert init_args["num_members"] == 512
    assert init_args.get("prior_variance", 1e-3) == 1e-3
    assert init_args.get("n_kfac", 10) == 10
