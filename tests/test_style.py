"""The code base stays ruff-clean (the rules in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "nnunet_synth", "tests", "benchmarks"],
                            cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ext_shim_reexports_exactly_the_trainers():
    import importlib.util

    import nnunet_synth.trainers as trainers
    from nnunet_synth.ext_path import EXT_TRAINER_DIR

    modules = sorted(p.name for p in EXT_TRAINER_DIR.glob("*.py"))
    assert modules == ["nnunet_synth_trainers.py"], "nnUNet_extTrainer folder must hold one thin shim module"
    spec = importlib.util.spec_from_file_location("nnunet_synth_trainers", EXT_TRAINER_DIR / modules[0])
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    exported = {k for k, v in vars(shim).items() if isinstance(v, type)}
    assert exported == set(trainers.__all__)
    assert all(getattr(shim, k).__module__.startswith("nnunet_synth.trainers.") for k in exported)
