"""Backbones: pretrained transformers that return one feature vector per sample."""

from lorae.backbones.base import Backbone, Inputs, Pretrained
from lorae.backbones.registry import create_backbone, known_backbones, register_backbone

__all__ = [
    "Backbone",
    "Inputs",
    "Pretrained",
    "create_backbone",
    "known_backbones",
    "register_backbone",
]
