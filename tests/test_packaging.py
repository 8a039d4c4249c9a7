"""Packaging: one version everywhere, the licence, the extras, and a plain install that imports without them.

The plain-install check runs in a subprocess whose import system refuses the packages of the ``[sd]`` and
``[convert]`` extras (diffusers, peft, transformers, pydicom, pynrrd), as on a machine that installed only
``pip install -e .``: every module of the package must still import, and code that needs an extra must say which.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import nnunet_synth
from nnunet_synth.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_one_version_everywhere():
    version = nnunet_synth.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    project = _pyproject()
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "nnunet_synth.__version__"}
    citation = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert f'\nversion: "{version}"\n' in citation
    assert f"## [{version}]" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")


def test_licence_and_citation():
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert _pyproject()["project"]["license"] == "Apache-2.0"
    citation = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert "cff-version: 1.2.0" in citation and "license: Apache-2.0" in citation
    for title in ("nnU-Net: a self-configuring method", "MONAI: An open-source framework",
                  "Selective Synthetic Augmentation", "SynBT", "Optimizing Synthetic Data for Enhanced Pancreatic",
                  "Tackling data scarcity"):
        assert title in citation, title


def test_dependencies_and_extras():
    project = _pyproject()["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert {"numpy", "scipy", "nnunetv2", "torch"} <= core
    assert "scipy>=1.15" in [r.split("#")[0].strip() for r in project["dependencies"]]  # stats.bootstrap(rng=...)
    assert {_name(r) for r in extras["sd"]} == {"diffusers", "peft", "transformers"}
    assert {_name(r) for r in extras["convert"]} == {"pydicom", "pynrrd"}
    assert not core & ({"diffusers", "peft", "transformers", "pydicom", "pynrrd"})
    assert "nnunet_synth[sd,convert]" in extras["test"] and {"pytest", "ruff"} <= {_name(r) for r in extras["test"]}
    # the import names the code checks for are those the extras install
    assert EXTRAS == {"sd": ("diffusers", "peft", "transformers"), "convert": ("pydicom", "nrrd")}


BLOCKED_IMPORTS = """
import importlib, json, pkgutil, sys

BLOCKED = {"diffusers", "peft", "transformers", "pydicom", "nrrd"}


class RefuseExtras:
    '''As if only the plain install were there: the packages of the [sd] and [convert] extras are missing.'''

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, RefuseExtras)
import nnunet_synth

failed, modules = {}, []
for info in pkgutil.walk_packages(nnunet_synth.__path__, "nnunet_synth."):
    modules.append(info.name)
    try:
        importlib.import_module(info.name)
    except Exception as error:
        failed[info.name] = f"{type(error).__name__}: {error}"
from nnunet_synth.dataset_conversion.cli import build_parser

build_parser()  # every cohort's options, DICOM ones included
from nnunet_synth.extras import MissingExtraError, require_extra

messages = {}
for extra in ("sd", "convert"):
    try:
        require_extra(extra)
    except MissingExtraError as error:
        messages[extra] = str(error)
print("RESULT " + json.dumps({"failed": failed, "modules": modules, "messages": messages,
                              "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)}))
"""


def test_every_module_imports_without_the_optional_extras():
    result = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS], cwd=ROOT, capture_output=True,
                            encoding="utf-8", errors="replace", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in reversed(result.stdout.splitlines()) if line.startswith("RESULT "))
    report = json.loads(line.removeprefix("RESULT "))
    assert report["failed"] == {}
    assert len(report["modules"]) > 80 and "nnunet_synth.generators.sd_inversion.components" in report["modules"]
    assert report["loaded"] == []
    assert 'pip install "nnunet_synth[sd]"' in report["messages"]["sd"]
    assert "diffusers, peft, transformers not installed" in report["messages"]["sd"]
    assert "pydicom, nrrd not installed" in report["messages"]["convert"]


def test_a_missing_extra_is_a_user_error():
    from nnunet_synth.cli import is_user_error
    from nnunet_synth.extras import MissingExtraError, require_extra

    with pytest.raises(MissingExtraError, match=r'needs the \[convert\] extra .*pip install "nnunet_synth\[convert\]"'):
        require_extra("convert", "nnunet_synth_no_such_module")
    assert is_user_error(MissingExtraError("x"))
    require_extra("sd")  # the test extra installs both
    require_extra("convert")
