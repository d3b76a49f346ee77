"""Tiny ``lorae`` configs for the CLI integration tests, written as YAML into a tmp folder.

Every model here is built offline (``pretrained: false``) with a few thousand parameters, so a
``fit`` step takes milliseconds on a CPU. Each builder returns a plain dict in the layout of a
``lorae`` config file (``seed_everything``, ``trainer``, ``model``, ``data``); tests tweak it and
write it with :func:`write_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.fixtures.builders import (
    write_glue_tsv,
    write_image_folder,
    write_tiny_tokenizer,
)
from tests.fixtures.models import TINY_BACKBONES

__all__ = [
    "DIGITS_NUM_CLASSES",
    "GLUE_N_DEV",
    "IMAGE_CLASSES",
    "IMAGE_PER_CLASS",
    "checkpoint_callback",
    "digits_lora_config",
    "digits_method_config",
    "digits_single_config",
    "glue_bert_config",
    "image_folder_config",
    "quiet_trainer",
    "tensorboard_logger",
    "write_config",
]

DIGITS_NUM_CLASSES = 10
IMAGE_CLASSES = ("cat", "dog", "frog")
IMAGE_PER_CLASS = 4
GLUE_N_DEV = 10

TIMM_DIGITS_OVERRIDES: dict[str, Any] = {
    "img_size": 8,
    "patch_size": 4,
    "in_chans": 1,
    "embed_dim": 16,
    "depth": 2,
    "num_heads": 2,
}
TORCHVISION_TINY_OVERRIDES: dict[str, Any] = TINY_BACKBONES["torchvision_vit"][1]
BERT_TINY_OVERRIDES: dict[str, Any] = TINY_BACKBONES["hf_bert"][1]


def quiet_trainer(**overrides: Any) -> dict[str, Any]:
    """Trainer options for fast, quiet CPU runs; no logger unless ``overrides`` set one."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "precision": "32-true",
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        **overrides,
    }


def tensorboard_logger(save_dir: Path, name: str = "tiny") -> dict[str, Any]:
    """A ``TensorBoardLogger`` writing into ``save_dir/name/version_*``."""
    return {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(save_dir), "name": name},
    }


def checkpoint_callback(dirpath: Path) -> dict[str, Any]:
    """A ``ModelCheckpoint`` (no monitor) writing into ``dirpath``, with ``last.ckpt``."""
    return {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(dirpath), "save_last": True},
    }


def _model(method: dict[str, Any]) -> dict[str, Any]:
    # A large learning rate and no warm-up so that a handful of steps visibly changes the
    # weights (the checkpoint round-trip tests rely on trained != freshly initialised).
    return {
        "method": method,
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
        "lr_decay": "constant",
        "warmup_steps": 0,
    }


def _lora(backbone: str, overrides: dict[str, Any], num_members: int) -> dict[str, Any]:
    return {
        "class_path": "lorae.methods.LoRAEnsemble",
        "init_args": {
            "backbone": backbone,
            "pretrained": False,
            "backbone_overrides": dict(overrides),
            "num_members": num_members,
            "lora": {"rank": 2, "gain": 1.0},
        },
    }


def _digits_data() -> dict[str, Any]:
    # 1,797 digits: 270 test samples (0.15), i.e. 5 evaluation batches of <= 64.
    return {
        "class_path": "lorae.data.DigitsDataModule",
        "init_args": {"batch_size": 16, "eval_batch_size": 64, "seed": 0},
    }


def digits_lora_config(num_members: int = 2, seed: int = 0) -> dict[str, Any]:
    """LoRA-Ensemble of a tiny timm ViT on scikit-learn's digits (1x8x8 images, 10 classes)."""
    return {
        "seed_everything": seed,
        "trainer": quiet_trainer(),
        "model": _model(_lora("vit_tiny_patch16_224", TIMM_DIGITS_OVERRIDES, num_members)),
        "data": _digits_data(),
    }


def digits_single_config(seed: int = 0) -> dict[str, Any]:
    """Single Network (full fine-tuning, one member) of a tiny timm ViT on the digits."""
    method = {
        "class_path": "lorae.methods.SingleNetwork",
        "init_args": {
            "backbone": "vit_tiny_patch16_224",
            "pretrained": False,
            "backbone_overrides": dict(TIMM_DIGITS_OVERRIDES),
        },
    }
    return {
        "seed_everything": seed,
        "trainer": quiet_trainer(),
        "model": _model(method),
        "data": _digits_data(),
    }


def digits_method_config(
    class_name: str, init_args: dict[str, Any], seed: int = 0
) -> dict[str, Any]:
    """Any ``lorae.methods`` class (its name, or a full ``class_path``) on a tiny timm ViT and
    the digits; ``init_args`` are the method's own options (backbone, ``pretrained: false`` and
    the tiny overrides are added)."""
    method = {
        "class_path": class_name if "." in class_name else f"lorae.methods.{class_name}",
        "init_args": {
            "backbone": "vit_tiny_patch16_224",
            "pretrained": False,
            "backbone_overrides": dict(TIMM_DIGITS_OVERRIDES),
            **init_args,
        },
    }
    return {
        "seed_everything": seed,
        "trainer": quiet_trainer(),
        "model": _model(method),
        "data": _digits_data(),
    }


def image_folder_config(
    root: Path, num_members: int = 2, write_data: bool = True
) -> dict[str, Any]:
    """LoRA-Ensemble of a tiny torchvision ``vit_b_32`` on an ImageFolder fixture in ``root``.

    With ``write_data`` the fixture is written first: ``train/`` and ``test/`` with
    :data:`IMAGE_PER_CLASS` random 16x16 JPEGs per class of :data:`IMAGE_CLASSES`.
    """
    if write_data:
        write_image_folder(root, classes=IMAGE_CLASSES, per_class=IMAGE_PER_CLASS, size=16)
    return {
        "seed_everything": 0,
        "trainer": quiet_trainer(),
        "model": _model(_lora("vit_b_32", TORCHVISION_TINY_OVERRIDES, num_members)),
        "data": {
            "class_path": "lorae.data.ImageFolderDataModule",
            "init_args": {
                "root": str(root),
                "image_size": 16,
                "batch_size": 4,
                "eval_batch_size": 5,
                "val_fraction": 0.2,
                "seed": 0,
            },
        },
    }


def glue_bert_config(root: Path, num_members: int = 2) -> dict[str, Any]:
    """LoRA-Ensemble of a tiny BERT on GLUE SST-2 style TSV files written into ``root``.

    Writes ``root/glue`` (``train.tsv``, :data:`GLUE_N_DEV` rows of ``dev.tsv``, the test split)
    and a WordPiece tokenizer folder ``root/tokenizer``.
    """
    data_dir = write_glue_tsv(root / "glue", n_train=16, n_dev=GLUE_N_DEV)
    tokenizer = write_tiny_tokenizer(root / "tokenizer")
    return {
        "seed_everything": 0,
        "trainer": quiet_trainer(),
        "model": _model(_lora("bert-base-uncased", BERT_TINY_OVERRIDES, num_members)),
        "data": {
            "class_path": "lorae.data.TextClassificationDataModule",
            "init_args": {
                "root": str(data_dir),
                "tokenizer": str(tokenizer),
                "max_length": 32,
                "batch_size": 4,
                "eval_batch_size": 4,
                "seed": 0,
            },
        },
    }


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write ``config`` as YAML to ``path`` (parents created) and return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path
