"""Registry of tumour generator backends: the one list of backends and of which of them train a model.

Backends register under a name; trainers and commands look them up with :func:`get_backend`. A backend with a
learned model names its training module in its class attribute ``training_module``;
``nnUNetv2_synth_train_generator`` offers exactly the backends of :func:`trainable_backends`. Where their files
live is :mod:`nnunet_synth.generators.paths`; how to add one is in docs/architecture.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from nnunet_synth.generators.base import Lesion, TumourGenerator

_BACKENDS: dict[str, type[TumourGenerator]] = {}

# Backends of the design that this version does not ship yet, with what they need.
_NOT_BUILT: dict[str, str] = {}


def register_backend(name: str) -> Callable[[type[TumourGenerator]], type[TumourGenerator]]:
    """Class decorator that registers a :class:`TumourGenerator` under ``name``."""

    def wrap(cls: type[TumourGenerator]) -> type[TumourGenerator]:
        if name in _BACKENDS and _BACKENDS[name] is not cls:
            raise ValueError(f"generator backend {name!r} is already registered by {_BACKENDS[name].__qualname__}")
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return wrap


# The modules of the shipped backends; importing one registers the backends it defines.
_BACKEND_MODULES = ("analytic", "ddpm", "ldm", "sd_inversion", "transplant")


def _import_backends() -> None:
    """Imports the shipped backend modules on the registry's first use, not when the package is imported: a
    command's ``--help`` and :mod:`nnunet_synth.generators.paths` stay free of torch."""
    for module in _BACKEND_MODULES:
        importlib.import_module(f"{__name__}.{module}")


def available_backends() -> list[str]:
    """Names of the backends that can be built."""
    _import_backends()
    return sorted(_BACKENDS)


def trainable_backends() -> list[str]:
    """Names of the backends with a training module (``nnUNetv2_synth_train_generator -g``)."""
    _import_backends()
    return sorted(name for name, cls in _BACKENDS.items() if cls.training_module is not None)


def get_backend(name: str) -> type[TumourGenerator]:
    """Returns the backend class registered under ``name``.

    Raises:
        NotImplementedError: for a backend of the design that is not built in this version.
        KeyError: for an unknown name; the message lists the available ones.
    """
    _import_backends()
    if name in _BACKENDS:
        return _BACKENDS[name]
    if name in _NOT_BUILT:
        raise NotImplementedError(f"generator backend {name!r}: {_NOT_BUILT[name]}. "
                                  f"Available backends: {', '.join(available_backends())}")
    raise KeyError(f"unknown generator backend {name!r}; available: {', '.join(available_backends())}")


__all__ = ["Lesion", "TumourGenerator", "available_backends", "get_backend", "register_backend", "trainable_backends"]
