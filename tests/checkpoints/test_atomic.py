"""The one atomic-write helper (lorae.checkpoints.atomic) behind checkpoints, exports and
metrics.json: readers see the complete old file or the complete new one, never a part."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorae.checkpoints.atomic import atomic_path


def test_the_new_file_replaces_the_old_and_no_partial_is_left(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "metrics.json"  # the folder is created
    with atomic_path(target) as partial:
        assert partial.parent == target.parent and partial.name.startswith(".metrics.json.")
        partial.write_text("new")
        assert not target.exists()  # nothing visible before the block ends
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as partial:
        partial.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
