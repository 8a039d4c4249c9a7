"""Registry of tumour generator backends.

Backends register under a name; trainers and commands look them up with :func:`get_backend`.
"""

from __future__ import annotations

from collections.abc import Callable

from nnunet_synth.generators.base import Lesion, TumourGenerator

_BACKENDS: dict[str, type[TumourGenerator]] = {}

# Learned backends described in DESIGN.md that this version does not ship yet, with what they need.
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


def available_backends() -> list[str]:
    """Names of the backends that can be built."""
    return sorted(_BACKENDS)


def get_backend(name: str) -> type[TumourGenerator]:
    """Returns the backend class registered under ``name``.

    Raises:
        NotImplementedError: for a backend of the design that is not built in this version.
        KeyError: for an unknown name; the message lists the available ones.
    """
    if name in _BACKENDS:
        return _BACKENDS[name]
    if name in _NOT_BUILT:
        raise NotImplementedError(f"generator backend {name!r}: {_NOT_BUILT[name]}. "
                                  f"Available backends: {', '.join(available_backends())}")
    raise KeyError(f"unknown generator backend {name!r}; available: {', '.join(available_backends())}")


# Importing the modules registers the backends they define.
from nnunet_synth.generators import analytic, ddpm, ldm, sd_inversion  # noqa: E402,F401

__all__ = ["Lesion", "TumourGenerator", "available_backends", "get_backend", "register_backend"]
