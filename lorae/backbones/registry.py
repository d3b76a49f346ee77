"""Backbone registry: ``create_backbone(name, pretrained)`` for every supported family.

A new family is one builder file plus one :func:`register_backbone` call here; nothing else
in lorae changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torchvision

from lorae.backbones.ast import AST_SOURCE, build_ast
from lorae.backbones.base import Backbone, Pretrained
from lorae.backbones.hf_bert import (
    BERT_ARCHITECTURES,
    PACKAGED_MODELS,
    build_hf_bert,
    packaged_model_path,
)
from lorae.backbones.timm_vit import TIMM_PATTERNS, build_timm_vit, is_timm_vit
from lorae.backbones.torchvision_vit import TORCHVISION_VITS, build_torchvision_vit
from lorae.data.preprocessing import (
    IMAGENET,
    ImagePreprocessing,
    Preprocessing,
    TextPreprocessing,
)
from lorae.errors import ConfigError

Builder = Callable[[str, Pretrained, Mapping[str, Any] | None], Backbone]


@dataclass(frozen=True)
class BackboneEntry:
    """One family in the registry: which names it accepts, how to build them, a description."""

    matches: Callable[[str], bool]
    build: Builder
    known: str


_REGISTRY: list[BackboneEntry] = []


def register_backbone(matches: Callable[[str], bool], build: Builder, known: str) -> None:
    """Add a family; ``known`` describes its accepted names for error messages."""
    _REGISTRY.append(BackboneEntry(matches, build, known))


register_backbone(
    lambda name: name in TORCHVISION_VITS,
    build_torchvision_vit,
    f"torchvision: {', '.join(TORCHVISION_VITS)}",
)
register_backbone(
    is_timm_vit,
    build_timm_vit,
    f"timm: any ViT/DeiT name matching {' or '.join(TIMM_PATTERNS)} "
    "(e.g. vit_base_patch32_224, deit_base_patch16_224; see timm.list_models('vit_*'))",
)
register_backbone(
    lambda name: name in BERT_ARCHITECTURES,
    build_hf_bert,
    f"Hugging Face BERT (text extra): {', '.join(BERT_ARCHITECTURES)}",
)
register_backbone(
    lambda name: name == "ast",
    build_ast,
    f"Audio Spectrogram Transformer on log-mel spectrograms: ast (from timm {AST_SOURCE})",
)


def image_preprocessing(name: str) -> ImagePreprocessing:
    """Input size and normalisation of a vision backbone's published weights, read from the
    library that publishes them (timm's pretrained config, torchvision's weights metadata).
    """
    if name in TORCHVISION_VITS:
        transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        return ImagePreprocessing(
            int(transform.crop_size[0]), tuple(transform.mean), tuple(transform.std)
        )
    if is_timm_vit(name):
        cfg = timm.get_pretrained_cfg(name.split(".")[0])
        if cfg is not None:
            mean, std = tuple(cfg.mean), tuple(cfg.std)
            return ImagePreprocessing(int(cfg.input_size[-1]), mean, std)  # type: ignore[arg-type]
        return IMAGENET
    raise ConfigError(
        f"{name!r} is not a known vision backbone; image preprocessing is defined for:\n  "
        + "\n  ".join(known_backbones()[:2])
    )


def backbone_preprocessing(name: str, pretrained: Pretrained = True) -> Preprocessing:
    """What the data module must feed backbone ``name``: the published image size and
    normalisation of a vision backbone, the tokenizer of a text backbone (its ``pretrained``
    folder when it is one, its package's folder for a packaged model, else its Hugging Face
    name), ``None`` for the audio backbone (its front end is the data module's) and for an
    unknown name (building the method reports that one).

    The CLI links ``model.method.init_args.backbone`` and ``pretrained`` through this to
    ``data.init_args.preprocessing``.
    """
    if name in BERT_ARCHITECTURES:
        if isinstance(pretrained, str):
            return TextPreprocessing(pretrained)
        if name in PACKAGED_MODELS:
            return TextPreprocessing(packaged_model_path(name))
        return TextPreprocessing(name)
    if name in TORCHVISION_VITS or is_timm_vit(name):
        return image_preprocessing(name)
    return None


def known_backbones() -> list[str]:
    """Human-readable description of every accepted backbone name, one line per family."""
    return [entry.known for entry in _REGISTRY]


def create_backbone(
    name: str, pretrained: Pretrained = True, overrides: Mapping[str, Any] | None = None
) -> Backbone:
    """Build a backbone by name.

    Args:
        name: a registered name (see :func:`known_backbones`).
        pretrained: ``True`` downloads the published weights through the family's own
            library (timm hub, torchvision, transformers); a path loads a local file
            (timm/torchvision) or folder (BERT); ``False`` initialises randomly.
        overrides: architecture arguments of the family's constructor (e.g. a small model
            for tests or training from scratch).

    Raises:
        ConfigError: the name is unknown; the message lists the known names.
        WeightsNotFoundError: weights could be neither loaded nor downloaded; the message
            says which file to fetch from where and how to pass it.
    """
    for entry in _REGISTRY:
        if entry.matches(name):
            return entry.build(name, pretrained, overrides)
    known = "\n  ".join(known_backbones())
    raise ConfigError(f"Unknown backbone {name!r}. Known backbones:\n  {known}")
