"""Generator, bank and template paths are keyed by nnU-Net's plans identifier; the default plans keep the old names.

Pure path functions (no nnU-Net subprocess), with nnU-Net's folder variables pointing at temporary folders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nnunet_synth.generator_training import main as train_main
from nnunet_synth.generators import TumourGenerator, available_backends, get_backend, trainable_backends
from nnunet_synth.generators.paths import (
    bank_dir,
    default_checkpoint,
    generate_command,
    generator_model_dir,
    generator_output_dir,
    resolve_checkpoint,
    template_file,
    train_command,
)

DATASET = "Dataset987_Paths"
RESENC = "nnUNetResEncUNetMPlans"


@pytest.fixture
def folders(tmp_path, monkeypatch) -> tuple[Path, Path]:
    preprocessed, results = tmp_path / "nnUNet_preprocessed", tmp_path / "nnUNet_results"
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    monkeypatch.setenv("nnUNet_results", str(results))
    return preprocessed / DATASET, results / DATASET


def test_default_plans_keep_their_names(folders):
    preprocessed, results = folders
    assert bank_dir(DATASET, "ddpm", "3d_fullres") == preprocessed / "nnUNetSynthBank_ddpm_3d_fullres"
    assert bank_dir(DATASET, "ddpm", "3d_fullres", "nnUNetPlans") == bank_dir(DATASET, "ddpm", "3d_fullres")
    assert generator_model_dir(DATASET, "ldm", "3d_fullres") == results / "nnUNetSynthGenerator_ldm__3d_fullres"
    assert generator_output_dir(DATASET, "sd_inversion", "2d", 1) == \
        results / "nnUNetSynthGenerator_sd_inversion__2d" / "fold_1"
    assert default_checkpoint(DATASET, "ddpm", "3d_fullres", 0) == \
        results / "nnUNetSynthGenerator_ddpm__3d_fullres" / "fold_0" / "checkpoint_best.pth"
    assert template_file(preprocessed, "3d_fullres") == preprocessed / "nnUNetSynthTemplates_3d_fullres.npz"
    assert train_command(5, "ddpm", "3d_fullres", 0) == "nnUNetv2_synth_train_generator -d 5 -g ddpm -c 3d_fullres -f 0"
    assert generate_command(5, "ldm", "3d_fullres", "all") == \
        "nnUNetv2_synth_generate -d 5 -g ldm -c 3d_fullres -f all -n N"


def test_other_plans_never_collide_with_the_default(folders):
    preprocessed, results = folders
    assert bank_dir(DATASET, "ddpm", "3d_fullres", RESENC) == \
        preprocessed / f"nnUNetSynthBank_ddpm_{RESENC}_3d_fullres"
    assert generator_model_dir(DATASET, "ddpm", "3d_fullres", RESENC) == \
        results / f"nnUNetSynthGenerator_ddpm__{RESENC}__3d_fullres"
    assert default_checkpoint(DATASET, "ddpm", "3d_fullres", 0, "final", RESENC) == \
        results / f"nnUNetSynthGenerator_ddpm__{RESENC}__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    assert template_file(preprocessed, "3d_fullres", RESENC) == \
        preprocessed / f"nnUNetSynthTemplates_{RESENC}_3d_fullres.npz"
    for make in (lambda p: bank_dir(DATASET, "ddpm", "3d_fullres", p),
                 lambda p: generator_output_dir(DATASET, "ddpm", "3d_fullres", 0, p),
                 lambda p: template_file(preprocessed, "3d_fullres", p)):
        assert make("nnUNetPlans") != make(RESENC)
    assert train_command(5, "ldm", "3d_fullres", 0, RESENC).endswith(f"-f 0 -p {RESENC}")
    assert f"-p {RESENC} -n N" in generate_command(5, "ldm", "3d_fullres", 0, RESENC)


def test_resolve_checkpoint_follows_the_plans_identifier(folders):
    _, results = folders
    params = {"fold": 2}
    default, fold = resolve_checkpoint(DATASET, "ldm", "3d_fullres", params)
    resenc, _ = resolve_checkpoint(DATASET, "ldm", "3d_fullres", params, RESENC)
    assert fold == 2 and default == results / "nnUNetSynthGenerator_ldm__3d_fullres" / "fold_2" / "checkpoint_best.pth"
    assert resenc.parent.parent.name == f"nnUNetSynthGenerator_ldm__{RESENC}__3d_fullres"
    assert resolve_checkpoint(DATASET, "sd_inversion", "2d", {}, default="final")[0].name == "checkpoint_final.pth"
    assert resolve_checkpoint(DATASET, "ddpm", "3d_fullres", {"checkpoint": "/x/y.pth"}) == (Path("/x/y.pth"), 0)


def test_one_registry_names_the_trainable_backends():
    assert trainable_backends() == sorted(n for n in available_backends() if get_backend(n).training_module)
    assert "analytic" in available_backends() and "analytic" not in trainable_backends()
    assert {"ddpm", "ldm", "sd_inversion"} <= set(trainable_backends())
    with pytest.raises(SystemExit) as e:  # the command's choices come from the registry
        train_main(["-d", DATASET, "-g", "analytic"])
    assert e.value.code == 2


def test_optional_hooks_default_to_none():
    class Plain(TumourGenerator):
        def synthesize(self, image: np.ndarray, lesion, spacing, rng) -> None:
            pass

    plain = Plain({})
    assert plain.max_lesion_shape is None and plain.checkpoint is None and plain.sampling_steps is None
    assert Plain.training_module is None
