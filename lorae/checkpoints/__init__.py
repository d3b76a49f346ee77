"""Checkpoint formats: data-only and atomic Lightning checkpoints (:mod:`.safe`), adapter-only
checkpoints and the ``.safetensors`` export (:mod:`.adapters`)."""

from lorae.checkpoints.safe import SafeCheckpointIO, load_checkpoint_safely

__all__ = ["SafeCheckpointIO", "load_checkpoint_safely"]
