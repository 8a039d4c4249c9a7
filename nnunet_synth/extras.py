"""Optional dependencies, installed with the package's extras (see pyproject.toml).

* ``[sd]``: diffusers, peft, transformers; only the ``sd_inversion`` backend (Stable Diffusion) needs them.
* ``[convert]``: pydicom, pynrrd; only the DICOM and ``.seg.nrrd`` cohort converters need them.

Every module of the package imports without them; a function that needs one calls :func:`require_extra` before
its first use, so a missing package stops with one line naming the pip command instead of a traceback.
"""

from __future__ import annotations

import importlib.util

# the import name of each optional dependency, by extra
EXTRAS: dict[str, tuple[str, ...]] = {"sd": ("diffusers", "peft", "transformers"), "convert": ("pydicom", "nrrd")}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_extra(extra: str, *modules: str) -> None:
    """Checks that the packages of ``extra`` (or only ``modules`` of them) can be imported.

    Args:
        extra: the name of the extra, a key of :data:`EXTRAS`.
        modules: import names to check; default: every package of the extra.

    Raises:
        MissingExtraError: naming the missing packages and ``pip install "nnunet_synth[<extra>]"``.
    """
    missing = [m for m in modules or EXTRAS[extra] if not _installed(m)]
    if missing:
        raise MissingExtraError(f"{', '.join(missing)} not installed: this needs the [{extra}] extra of nnunet_synth "
                                f"(pip install \"nnunet_synth[{extra}]\"; in a checkout pip install -e \".[{extra}]\")")
