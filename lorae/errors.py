"""User-facing errors.

Every error a user can cause by configuration or input derives from :class:`LoraeError`.
The CLI prints these as one clear message (what is wrong, how to fix it) instead of a
traceback; library users can catch them by the standard base class they also derive from.
"""

from __future__ import annotations


class LoraeError(Exception):
    """Base class of all errors caused by user input or configuration."""


class ConfigError(LoraeError, ValueError):
    """An option has a value that is not allowed; the message lists the allowed ones."""


class DataNotFoundError(LoraeError, FileNotFoundError):
    """A data file or folder is missing; the message names it and where to get it."""


class WeightsNotFoundError(LoraeError, FileNotFoundError):
    """Pretrained weights can be neither loaded locally nor downloaded."""


class CheckpointMismatchError(LoraeError, ValueError):
    """A checkpoint was trained with settings that differ from the current configuration."""


class CorruptSampleError(LoraeError, ValueError):
    """A data file (image, WAV, TSV row ...) cannot be read; the message names the file and,
    for text files, the line."""


class UnsafeCheckpointError(LoraeError, ValueError):
    """A checkpoint holds Python objects that would run code when unpickled."""


class CheckpointReadError(LoraeError, ValueError):
    """A checkpoint file is truncated or not a checkpoint."""


class NonFiniteLossError(LoraeError, FloatingPointError):
    """The training loss became NaN or infinite."""


class OutputExistsError(LoraeError, FileExistsError):
    """An output file exists and replacing it was not asked for; the message names the option
    that allows it."""
