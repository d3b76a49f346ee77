"""Backbones: pretrained transformers that return one feature vector per sample. Each family
owns its preprocessing (:func:`backbone_preprocessing`) and its LoRA target family name."""

from lorae.backbones.base import Backbone, Inputs, Pretrained
from lorae.backbones.registry import (
    backbone_preprocessing,
    create_backbone,
    image_preprocessing,
    known_backbones,
    register_backbone,
)

__all__ = [
    "Backbone",
    "Inputs",
    "Pretrained",
    "backbone_preprocessing",
    "create_backbone",
    "image_preprocessing",
    "known_backbones",
    "register_backbone",
]
