"""nnunet_synth: synthetic-tumour augmentation for nnU-Net v2.

The public Python API (see docs/api.md): :func:`insert_tumours` (the lesion pipeline on a whole case or a
patch), :class:`SynthPlan` (the typed synth plan; :meth:`SynthPlan.for_volume` for a volume without an nnU-Net
dataset) and :func:`load_synth_plan` (the validated plan of a preprocessed nnU-Net dataset). They load lazily,
so ``python -m nnunet_synth.ext_path`` stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and linters; at run time __getattr__ imports on first use
    from nnunet_synth.generators.lesions import LesionInfo, insert_tumours
    from nnunet_synth.planning import load_synth_plan
    from nnunet_synth.synth_plan import SynthPlan, SynthPlanError

# The one place the version is written: pyproject.toml reads it (setuptools dynamic version), CHANGELOG.md and
# CITATION.cff name it (tests/test_packaging.py checks that they agree).
__version__ = "0.1.0"

__all__ = ["LesionInfo", "SynthPlan", "SynthPlanError", "insert_tumours", "load_synth_plan"]

_LAZY = {"insert_tumours": "nnunet_synth.generators.lesions", "LesionInfo": "nnunet_synth.generators.lesions",
         "SynthPlan": "nnunet_synth.synth_plan", "SynthPlanError": "nnunet_synth.synth_plan",
         "load_synth_plan": "nnunet_synth.planning"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nnunet_synth' has no attribute {name!r}")
