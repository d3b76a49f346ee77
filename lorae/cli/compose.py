"""Composed config files: a ``base:`` key includes other config files (paper recipes).

A config may start with ``base: FILE`` (or a list of files), each path relative to the
including file. The bases are loaded first, in order, each with its own ``base:`` resolved the
same way, then the including file is merged on top: mappings merge key by key, anything else
(a number, a string, a list such as ``trainer.callbacks``) replaces the base's value. So
``configs/cifar100/base.yaml`` holds the data set's recipe once and
``configs/cifar100/lora_ensemble.yaml`` only its method::

    base: base.yaml
    model:
      method:
        class_path: lorae.methods.LoRAEnsemble
        init_args: {num_members: 16, lora: {rank: 8}}

:func:`expand_config_args` turns every ``--config FILE`` whose file has a ``base:`` into one
``--config`` holding the merged YAML, before LightningCLI parses the arguments. Everything that
parses through :func:`lorae.cli.main.build_cli` (``lorae fit|validate|test|predict``,
``--print_config``, ``lorae crossval``, ``lorae analyze``) therefore sees one ordinary config;
the ``config.yaml`` saved into a run folder is the fully resolved config, without ``base:``.
A file without ``base:`` is passed through unchanged.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from lorae.errors import ConfigError, DataNotFoundError

__all__ = ["BASE_KEY", "base_paths", "expand_config_args", "load_composed", "merge"]

#: The top-level key that names a config's base file(s).
BASE_KEY = "base"
_CONFIG_OPTIONS = ("--config", "-c")


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` merged onto ``base``: mappings recursively, other values replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    if "class_path" in merged:  # jsonargparse resolves init_args only after their class_path
        merged = {"class_path": merged.pop("class_path"), **merged}
    return merged


def _read(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"Cannot read config file '{path}': {error}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"Config file '{path}' is not UTF-8 text ({error.reason}): give --config a YAML file."
        ) from error
    except yaml.YAMLError as error:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {error}") from error
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping, got {type(content)}.")
    return content


def base_paths(path: Path, content: Mapping[str, Any]) -> list[Path]:
    """The files named by ``content``'s ``base:`` key, resolved relative to ``path``."""
    bases = content.get(BASE_KEY)
    if bases is None:
        return []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, Sequence) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"'{BASE_KEY}:' in '{path}' must be a file name or a list of them.")
    return [path.parent / b for b in bases]


def load_composed(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The config of ``path`` with its bases merged in, without the ``base:`` key.

    Raises:
        ConfigError: If a file is missing, is no YAML mapping, or includes itself.
    """
    path = Path(path)
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"Config files include each other in a cycle: {chain}")
    content = _read(path)
    composed: dict[str, Any] = {}
    for base in base_paths(path, content):
        if not base.is_file():
            raise ConfigError(f"'{path}' names base '{base}', which does not exist.")
        composed = merge(composed, load_composed(base, (*_seen, resolved)))
    return merge(composed, {k: v for k, v in content.items() if k != BASE_KEY})


def _config_value(value: str, drop: Collection[str] = ()) -> str:
    """What LightningCLI gets for one ``--config`` value: inline YAML unchanged; a file that
    does not exist or is not a YAML mapping a clear error naming it; a file with a ``base:``
    or one of the top-level keys ``drop`` its composed YAML text without those keys; any other
    file its path."""
    if "\n" in value or value.lstrip().startswith("{"):  # YAML text, not a file
        return value
    path = Path(value)
    try:
        is_file = path.is_file()
    except OSError:  # e.g. a name too long for the file system
        is_file = False
    if not is_file:
        kind = " (it is a folder)" if path.is_dir() else ""
        raise DataNotFoundError(
            f"Config file '{value}' does not exist{kind}: give --config the path of a YAML "
            "file, e.g. configs/quickstart.yaml."
        )
    content = _read(path)
    if BASE_KEY not in content and not any(key in content for key in drop):
        return value
    composed = {k: v for k, v in load_composed(path).items() if k not in drop}
    return yaml.safe_dump(composed, sort_keys=False)


def expand_config_args(args: Sequence[str], drop: Collection[str] = ()) -> list[str]:
    """``args`` with each ``--config FILE`` (``-c FILE``, ``--config=FILE``) whose file has a
    ``base:`` replaced by ``--config`` and the composed YAML text (see the module docstring).

    ``drop``: top-level keys removed from every config file, e.g. a run's saved
    ``config.yaml`` records ``fit``'s ``ckpt_path`` and ``weights_only``, which a parser
    without subcommands (``lorae analyze``, ``lorae calibrate``) does not accept."""
    expanded: list[str] = []
    take_next = False
    for arg in args:
        if take_next:
            expanded.append(_config_value(arg, drop))
            take_next = False
            continue
        option, eq, value = arg.partition("=")
        if option in _CONFIG_OPTIONS and eq:
            expanded.append(f"{option}={_config_value(value, drop)}")
            continue
        take_next = arg in _CONFIG_OPTIONS
        expanded.append(arg)
    return expanded
