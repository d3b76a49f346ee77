"""CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich 2019): the test set under 19 corruptions
at 5 severities, as shifted test sets (``kind="shift"``) of ``lorae test``.

Two sources, one per sample order: the official ``.npy`` files (``<corruption>.npy`` of shape
``(5 * N, 32, 32, 3)`` uint8, severity 1 first, and ``labels.npy``), or, when no folder is
given, corruptions computed on the fly from the clean test images with the ``imagecorruptions``
package (``pip install 'lorae[corruptions]'``). The generated images use that package's
parameters, which were tuned on ImageNet-C, so they are close to but not identical to the
official CIFAR-C files: report which source a number comes from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from lorae.errors import ConfigError, CorruptSampleError, DataNotFoundError

__all__ = [
    "CIFAR_C_URLS",
    "CORRUPTIONS",
    "CorruptedDataset",
    "Corruption",
    "NpyCorruptionDataset",
    "check_corruptions",
    "corruption_sets",
]

Corruption = Literal[
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
    "speckle_noise",
    "gaussian_blur",
    "spatter",
    "saturate",
]
#: The 19 corruptions of CIFAR-10-C / CIFAR-100-C (15 benchmark + 4 extra), file-name order.
CORRUPTIONS: tuple[str, ...] = get_args(Corruption)
SEVERITIES = (1, 2, 3, 4, 5)

CIFAR_C_URLS = {
    "CIFAR-10-C": "https://zenodo.org/record/2535967 (CIFAR-10-C.tar)",
    "CIFAR-100-C": "https://zenodo.org/record/3555552 (CIFAR-100-C.tar)",
}


class NpyCorruptionDataset(Dataset[tuple[Any, int]]):
    """One severity of one official CIFAR-C ``.npy`` file, memory-mapped.

    Args:
        images: Array ``(5 * N, 32, 32, 3)`` uint8 (memory-mapped).
        labels: Array ``(5 * N,)``.
        severity: 1 to 5; rows ``(severity - 1) * N`` to ``severity * N``.
        transform: Applied to each PIL image (the in-distribution test transform).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        severity: int,
        transform: Callable[[Any], Any],
    ) -> None:
        self.per_severity = len(labels) // len(SEVERITIES)
        self.offset = (severity - 1) * self.per_severity
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return self.per_severity

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self.offset + index
        image = Image.fromarray(np.asarray(self.images[row], dtype=np.uint8))
        return self.transform(image), int(self.labels[row])


class CorruptedDataset(Dataset[tuple[Any, int]]):
    """A clean image dataset with one corruption applied on the fly by ``imagecorruptions``.

    Each sample's random draw is seeded by ``(seed, severity, index)``, so a sample is the same
    in every epoch and run; NumPy's global random state is restored afterwards.

    Args:
        dataset: Yields ``(PIL image, label)``.
        corruption: One of :data:`CORRUPTIONS`.
        severity: 1 to 5.
        transform: Applied to the corrupted PIL image (the in-distribution test transform).
        seed: Base seed of the corruption noise.
    """

    def __init__(
        self,
        dataset: Dataset[tuple[Any, int]],
        corruption: str,
        severity: int,
        transform: Callable[[Any], Any],
        seed: int = 0,
    ) -> None:
        self.corrupt = _imagecorruptions()
        self.dataset = dataset
        self.corruption = corruption
        self.severity = severity
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        state = np.random.get_state()
        np.random.seed((self.seed * 1_000_003 + self.severity * 100_003 + index) % 2**32)
        try:
            corrupted = self.corrupt(
                pixels, corruption_name=self.corruption, severity=self.severity
            )
        finally:
            np.random.set_state(state)
        return self.transform(Image.fromarray(np.uint8(corrupted))), int(label)


def _imagecorruptions() -> Callable[..., np.ndarray]:
    try:
        from imagecorruptions import corrupt
    except ImportError as error:
        raise ConfigError(
            "Generating CIFAR-C corruptions needs the optional package imagecorruptions: "
            "pip install 'lorae[corruptions]'. Or download the official files ("
            + ", ".join(f"{k}: {v}" for k, v in CIFAR_C_URLS.items())
            + ") and set corruption_root to the extracted folder."
        ) from error
    return corrupt


def check_corruptions(corruptions: Sequence[str], severities: Sequence[int]) -> None:
    """Raise :class:`ConfigError` for an unknown corruption or a severity outside 1..5."""
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ConfigError(f"Unknown corruption(s) {unknown}; choose from {list(CORRUPTIONS)}.")
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise ConfigError(f"corruption_severities must be a non-empty subset of 1..5, got {bad}.")


def _load_npy(path: Path, folder_name: str) -> np.ndarray:
    if not path.is_file():
        raise DataNotFoundError(
            f"CIFAR-C file '{path}' not found. corruption_root must be the extracted "
            f"{folder_name} folder (19 files <corruption>.npy and labels.npy) from "
            f"{CIFAR_C_URLS[folder_name]}; or leave corruption_root unset to generate the "
            "corruptions with the imagecorruptions package."
        )
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError) as error:
        raise CorruptSampleError(f"CIFAR-C file '{path}' cannot be read: {error}") from error


def corruption_sets(
    clean_test: Dataset[tuple[Any, int]],
    transform: Callable[[Any], Any],
    corruptions: Sequence[str],
    severities: Sequence[int],
    root: str | None,
    folder_name: Literal["CIFAR-10-C", "CIFAR-100-C"],
    seed: int,
) -> list[tuple[str, Dataset[tuple[Any, int]]]]:
    """Named shifted test sets ``"<corruption>/<severity>"``, corruption-major.

    Args:
        clean_test: The clean test set, yielding ``(PIL image, label)`` (used to generate).
        transform: The in-distribution test transform, applied after corrupting.
        corruptions: Names from :data:`CORRUPTIONS`.
        severities: Subset of 1..5.
        root: Folder with the official ``.npy`` files; ``None`` generates the corruptions.
        folder_name: Official folder name, for messages.
        seed: Base seed of generated corruptions.

    Raises:
        ConfigError: Unknown corruption or severity; imagecorruptions missing when generating.
        DataNotFoundError: ``root`` lacks a file.
        CorruptSampleError: A ``.npy`` file cannot be read or has the wrong shape.
    """
    check_corruptions(corruptions, severities)
    sets: list[tuple[str, Dataset[tuple[Any, int]]]] = []
    if root is None:
        for name in corruptions:
            for severity in severities:
                sets.append(
                    (
                        f"{name}/{severity}",
                        CorruptedDataset(clean_test, name, severity, transform, seed),
                    )
                )
        return sets
    labels = _load_npy(Path(root) / "labels.npy", folder_name)
    if len(labels) % len(SEVERITIES):
        raise CorruptSampleError(
            f"'{Path(root) / 'labels.npy'}' has {len(labels)} labels, not 5 severities x N."
        )
    for name in corruptions:
        path = Path(root) / f"{name}.npy"
        images = _load_npy(path, folder_name)
        if images.ndim != 4 or images.shape[0] != len(labels) or images.shape[-1] != 3:
            raise CorruptSampleError(
                f"CIFAR-C file '{path}' has shape {images.shape}; expected "
                f"({len(labels)}, H, W, 3) to match labels.npy."
            )
        for severity in severities:
            dataset = NpyCorruptionDataset(images, labels, severity, transform)
            sets.append((f"{name}/{severity}", dataset))
    return sets
