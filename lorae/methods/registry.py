"""The one list of methods: ``METHODS``, name -> class.

Each method's file registers its class with :func:`register_method` where the class is
defined, and ``lorae.methods`` imports every file of its folder, so importing the package
fills the registry. Tests, benchmarks, the docs check and the CLI's "unknown method" message
read this list instead of keeping their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from lorae.errors import ConfigError
from lorae.methods.base import EnsembleMethod

#: Registered methods by name (snake case, the name of the method's configs, e.g.
#: ``configs/cifar100/lora_ensemble.yaml``), in registration order.
METHODS: dict[str, type[EnsembleMethod]] = {}

MethodClass = TypeVar("MethodClass", bound=type[EnsembleMethod])


def register_method(name: str) -> Callable[[MethodClass], MethodClass]:
    """Class decorator adding the class to :data:`METHODS` under ``name``.

    Raises:
        ValueError: ``name`` already belongs to another class.
    """

    def add(cls: MethodClass) -> MethodClass:
        known = METHODS.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"Method name {name!r} is taken by {class_path(known)}.")
        METHODS[name] = cls
        return cls

    return add


def class_path(cls: type[EnsembleMethod]) -> str:
    """The ``class_path`` a config names ``cls`` by: ``lorae.methods.<Class>`` for the
    package's methods (they are re-exported there), else the defining module's path."""
    package = "lorae.methods"
    if cls.__module__.startswith(package + "."):
        return f"{package}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__name__}"


def method_class(name: str) -> type[EnsembleMethod]:
    """The class registered under ``name``, or a ConfigError listing the registered names."""
    if name not in METHODS:
        raise ConfigError(f"Unknown method {name!r}; registered: {', '.join(METHODS)}.")
    return METHODS[name]
