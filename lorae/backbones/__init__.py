"""Backbones: pretrained transformers that return one feature vector per sample."""

from lorae.backbones.base import Backbone, Inputs, Pretrained
from lorae.backbones.registry import (
    IMAGENET,
    ImagePreprocessing,
    create_backbone,
    image_preprocessing,
    known_backbones,
    register_backbone,
)

__all__ = [
    "IMAGENET",
    "Backbone",
    "ImagePreprocessing",
    "Inputs",
    "Pretrained",
    "create_backbone",
    "image_preprocessing",
    "known_backbones",
    "register_backbone",
]
