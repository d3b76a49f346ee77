"""The one way lorae writes a file that must never be seen half-written (checkpoints,
exports, ``metrics.json``, prediction files)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A temporary path beside ``target`` to write to; renamed over ``target`` when the block
    ends normally, removed when it raises.

    The temporary name is ``.<name>.partial-<pid>`` in the target's folder (created if
    missing), so the rename stays on one file system and is atomic on POSIX; it never matches
    Lightning's ``last*.ckpt`` pattern. The data is flushed to disk before the rename, so a
    crash right after leaves the complete new file or the complete old one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        yield partial
        with partial.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
