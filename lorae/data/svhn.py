"""SVHN test set (Netzer et al. 2011), the paper's out-of-distribution set for CIFAR models."""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import SVHN

from lorae.errors import CorruptSampleError, DataNotFoundError

__all__ = ["SVHN_TEST_URL", "load_svhn_test"]

SVHN_TEST_URL = "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"


class _SVHN(SVHN):
    """torchvision's SVHN without its md5 check of the ``.mat`` file.

    The download itself is unchanged; skipping the checksum lets the reader open any file in
    the official format (the test fixtures are a few KB). A damaged file still fails, when
    ``scipy.io.loadmat`` reads it, with :class:`~lorae.errors.CorruptSampleError`.
    """

    split_list = {split: [url, name, None] for split, (url, name, _) in SVHN.split_list.items()}


def load_svhn_test(root: str | Path, download: bool) -> SVHN:
    """The 26,032 SVHN test digits from ``root/test_32x32.mat`` (downloaded if asked).

    Samples are ``(PIL RGB 32x32 image, digit)`` pairs.

    Raises:
        DataNotFoundError: If the file is missing and ``download`` is false.
        CorruptSampleError: If the file cannot be read as a MATLAB file with ``X`` and ``y``.
    """
    path = Path(root) / "test_32x32.mat"
    try:
        return _SVHN(str(root), split="test", download=download)
    except RuntimeError as error:
        raise DataNotFoundError(
            f"SVHN test file '{path}' not found. Download test_32x32.mat from {SVHN_TEST_URL} "
            "into that folder, or set `download: true` on a machine with internet access."
        ) from error
    except Exception as error:  # scipy's loadmat raises ValueError, KeyError, OSError, ...
        raise CorruptSampleError(
            f"SVHN file '{path}' cannot be read ({type(error).__name__}: {error}). Download "
            f"it again from {SVHN_TEST_URL}."
        ) from error
