"""``lorae export``: write a checkpoint's adapters to one ``.safetensors`` file.

Works on full and adapter-only checkpoints (``model.checkpoint``). The file holds only what
the ensemble adds to its frozen pretrained backbone (LoRA factors, heads, buffers such as
snapshots or posterior factors; see :func:`lorae.checkpoints.adapters.adapter_state_dict`),
plus metadata: the method's identity and config (JSON), the fingerprint of the frozen weights
and the lorae version. Load it with :func:`lorae.checkpoints.export.load_adapters` (onto a
method you built) or :func:`lorae.checkpoints.export.build_from_export` (rebuilds the method
from the metadata). The file is written atomically and an existing one is replaced only with
``--force``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorae.checkpoints.adapters import tensor_bytes
from lorae.checkpoints.export import export_checkpoint, read_export

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Entry point of ``lorae export``."""
    parser = argparse.ArgumentParser(
        prog="lorae export",
        description="Write the adapter tensors (everything but the frozen pretrained backbone) "
        "of a lorae checkpoint to one .safetensors file with the method's config as metadata.",
    )
    parser.add_argument("--ckpt_path", type=Path, required=True, help="a lorae .ckpt file")
    parser.add_argument("--output", type=Path, required=True, help="the .safetensors to write")
    parser.add_argument("--force", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    written = export_checkpoint(args.ckpt_path, args.output, force=args.force)
    tensors, metadata = read_export(written)
    size = tensor_bytes(tensors)
    print(
        f"Wrote {len(tensors)} adapter tensors ({size / 2**20:.2f} MiB) to {written} "
        f"(frozen-weight fingerprint {metadata['fingerprint'][:12]})."
    )
    return 0
