"""The backbone registry: names, local weights, and the errors users see offline."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import pytest
import timm
import torch
import torchvision
import transformers
from safetensors.torch import save_file

from lorae.backbones import create_backbone, known_backbones
from lorae.backbones.base import BackboneFamily
from lorae.errors import ConfigError, WeightsNotFoundError
from lorae.lora.targets import TARGETS
from tests.fixtures.models import FAMILIES, TINY_BACKBONES, tiny_inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_features_shape_and_family(family: str) -> None:
    name, overrides = TINY_BACKBONES[family]
    backbone = create_backbone(name, False, overrides)
    assert backbone.family == family
    assert backbone(tiny_inputs(family, 3)).shape == (3, backbone.feature_dim)
    assert backbone.feature_dim == 16
    assert all(module.training for module in backbone.modules())


def test_timm_deit_and_tagged_names_are_accepted() -> None:
    overrides = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}
    assert create_backbone("deit_tiny_patch16_224", False, overrides).family == "timm_vit"
    tagged = create_backbone("vit_tiny_patch16_224.augreg_in21k", False, overrides)
    assert tagged.family == "timm_vit"


def test_unknown_name_lists_known_backbones() -> None:
    with pytest.raises(ConfigError) as info:
        create_backbone("resnet50", False)
    message = str(info.value)
    assert "Unknown backbone 'resnet50'" in message
    names = ("vit_b_32", "vit_base_patch32_224", "bert-base-uncased", "all-MiniLM-L6-v2", "ast")
    for expected in names:
        assert expected in message
    assert len(known_backbones()) == 4  # torchvision, timm, BERT, AST


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_loads_local_file(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, overrides = TINY_BACKBONES["timm_vit"]
    source = create_backbone(name, False, overrides)
    path = tmp_path / f"model{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    overlays: list[dict[str, object]] = []
    create_model = timm.create_model

    def recording(*args: object, **kwargs: object) -> object:
        overlays.append(kwargs["pretrained_cfg_overlay"])  # type: ignore[arg-type]
        return create_model(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", recording)
    loaded = create_backbone(name, str(path), overrides)
    assert _same_weights(loaded.model, source.model)
    # The file is a state dict, not the JAX .npz the default cfg of vit_* names: timm 1.0.29
    # read it with the .npz loader unless custom_load is turned off (seen on a GPU machine).
    assert overlays == [{"file": str(path), "custom_load": False}]


def test_torchvision_loads_local_file(tmp_path: Path) -> None:
    name, overrides = TINY_BACKBONES["torchvision_vit"]
    torch.manual_seed(0)
    full = torchvision.models.vision_transformer.VisionTransformer(**overrides, num_classes=7)
    path = tmp_path / "vit_b_32-tiny.pth"
    torch.save(full.state_dict(), path)  # as torchvision publishes it: with the 'heads' layer
    loaded = create_backbone(name, str(path), overrides)
    x = tiny_inputs("torchvision_vit", 2)
    full.heads = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), full.eval()(x))


def test_bert_loads_local_folder(tmp_path: Path) -> None:
    name, overrides = TINY_BACKBONES["hf_bert"]
    source = create_backbone(name, False, overrides)
    source.model.save_pretrained(tmp_path / "bert")
    loaded = create_backbone(name, str(tmp_path / "bert"))
    assert _same_weights(loaded.model, source.model)
    # Loaded weights come in train mode like every new module (HF returns eval mode).
    assert all(module.training for module in loaded.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_local_weights_name_the_path(tmp_path: Path, family: str) -> None:
    name, overrides = TINY_BACKBONES[family]
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(WeightsNotFoundError, match="nothing is there") as info:
        create_backbone(name, str(missing), overrides)
    assert str(missing) in str(info.value)


def _offline(*args: object, **kwargs: object) -> None:
    raise OSError("[Errno -2] Name or service not known")


def test_timm_download_failure_says_what_to_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timm, "create_model", _offline)
    with pytest.raises(WeightsNotFoundError) as info:
        create_backbone("vit_base_patch32_224", True)
    message = str(info.value)
    assert "huggingface.co/timm/vit_base_patch32_224" in message
    assert "pretrained: /path/to/model.safetensors" in message


def test_torchvision_download_failure_says_what_to_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    weights = torchvision.models.ViT_B_32_Weights.IMAGENET1K_V1
    monkeypatch.setattr(type(weights), "get_state_dict", _offline)
    overrides = TINY_BACKBONES["torchvision_vit"][1]
    with pytest.raises(WeightsNotFoundError) as info:
        create_backbone("vit_b_32", True, overrides)
    message = str(info.value)
    assert weights.url in message and "vit_b_32-d86f8d99.pth" in message


def test_bert_download_failure_says_what_to_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transformers.BertModel, "from_pretrained", _offline)
    with pytest.raises(WeightsNotFoundError) as info:
        create_backbone("bert-base-uncased", True)
    assert "https://huggingface.co/bert-base-uncased" in str(info.value)
    assert "pretrained: /path/to/folder" in str(info.value)


def test_torchvision_weights_of_another_architecture_are_a_clear_error(tmp_path: Path) -> None:
    name, overrides = TINY_BACKBONES["torchvision_vit"]
    other = torchvision.models.vision_transformer.VisionTransformer(
        **{**overrides, "hidden_dim": 8}
    )
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ConfigError, match="do not fit backbone 'vit_b_32'"):
        create_backbone(name, str(path), overrides)


def test_wrong_input_kind_is_a_clear_error() -> None:
    vit_name, vit_overrides = TINY_BACKBONES["torchvision_vit"]
    with pytest.raises(ConfigError, match="takes image tensors"):
        create_backbone(vit_name, False, vit_overrides)(tiny_inputs("hf_bert", 2))
    bert_name, bert_overrides = TINY_BACKBONES["hf_bert"]
    with pytest.raises(ConfigError, match="takes token tensors"):
        create_backbone(bert_name, False, bert_overrides)(tiny_inputs("timm_vit", 2))


# --------------------------------------------------------------- families and the LoRA table


def test_lora_target_table_has_exactly_the_backbone_families() -> None:
    """The backbone owns its family (the Literal); LoRA's table is keyed by the same names."""
    assert set(TARGETS) == set(get_args(BackboneFamily))
    assert set(FAMILIES) == set(get_args(BackboneFamily)), "a tiny backbone per family"


def _imports(package: Path) -> dict[str, set[str]]:
    """``{file: modules it imports}`` for every Python file of ``package``."""
    found: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[path.name] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("backbones", "lorae.lora"), ("lora", "lorae.backbones"), ("methods", "lorae.module")],
)
def test_layering(package: str, forbidden: str) -> None:
    """Downward only: backbones and LoRA know nothing of each other, methods not the module."""
    root = Path(__file__).resolve().parents[2] / "lorae" / package
    offending = {
        file: sorted(n for n in names if n == forbidden or n.startswith(forbidden + "."))
        for file, names in _imports(root).items()
    }
    assert not {f: n for f, n in offending.items() if n}, offending
