"""Size and boundary studies with the papers' generators: a bank made with shape settings (``--size-class``,
``--deformation``, ``--size-preset``) has its own folder named by them and records them in its manifest, and the
study trainers (``nnUNetTrainerSynth20TinyLDM``, ``nnUNetTrainerSynth20SimplexDDPM``, ...) mix that bank and no
other, refusing to start without it and naming the command that makes it.

The banks here are made with the analytic backend (no learned model to train): folder naming, manifest and
trainer wiring do not depend on the backend.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from nnunet_synth import trainers
from nnunet_synth.bank import MANIFEST_DIR, BankError, bank_identifiers, bank_plan, check_bank, is_bank_identifier
from nnunet_synth.bank import main as generate_main
from nnunet_synth.generators.paths import bank_dir, bank_suffix, generate_command
from nnunet_synth.generators.sizes import class_radii_mm
from nnunet_synth.generators.splits import split_cases
from nnunet_synth.planning import preprocessed_dir
from nnunet_synth.trainers.bank import nnUNetTrainerSynthBank

from .conftest import cpu_trainer as _trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BANK_CASES = 3
# the label-free preset's class radii (4/8/16/32 mm) keep the classes apart, so the semi-axes tell tiny from the
# rest (the phantom's quartile classes overlap); its tiny class gives several lesions per case
SHAPES = {"size_preset": "labelfree", "size_class": "tiny", "deformation": "simplex"}
FOLDER = "nnUNetSynthBank_analytic_3d_fullres_labelfree_tiny_simplex"
LEGACY_FOLD = 9  # a fold no other test writes: the hand-made manifest of a bank made before the naming
STUDY_TRAINERS = {
    "nnUNetTrainerSynth20TinyLDM": ("ldm", {"size_class": "tiny"}),
    "nnUNetTrainerSynth20SmallLDM": ("ldm", {"size_class": "small"}),
    "nnUNetTrainerSynth20MediumLDM": ("ldm", {"size_class": "medium"}),
    "nnUNetTrainerSynth20LargeLDM": ("ldm", {"size_class": "large"}),
    "nnUNetTrainerSynth20MixedLDM": ("ldm", {"size_class": "mixed"}),
    "nnUNetTrainerSynth20TemplateLDM": ("ldm", {"deformation": "template"}),
    "nnUNetTrainerSynth20ElasticDDPM": ("ddpm", {"deformation": "elastic"}),
    "nnUNetTrainerSynth20SimplexDDPM": ("ddpm", {"deformation": "simplex"}),
}


class TinySimplexAnalyticBank(nnUNetTrainerSynthBank):
    """A study trainer on this module's analytic bank (as the LDM/DDPM ones on theirs)."""

    synth_backend = "analytic"
    synth_shapes = SHAPES




@pytest.fixture(scope="module")
def study_bank(phantom_ct):
    """A Tiny, simplex-deformed analytic bank of fold 0, made as the docs say (removed afterwards)."""
    folder = bank_dir(phantom_ct, "analytic", "3d_fullres", shapes=SHAPES)
    shutil.rmtree(folder, ignore_errors=True)
    generate_main(["-d", str(phantom_ct), "-g", "analytic", "-n", str(BANK_CASES), "--size-preset", "labelfree",
                   "--size-class", "tiny", "--deformation", "simplex"])
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_bank_folder_name_carries_the_shape_settings(phantom_ct):
    base = preprocessed_dir(phantom_ct)
    # the bank of the synth plan's own shapes keeps its name (existing banks and their trainers)
    assert bank_dir(phantom_ct, "ldm", "3d_fullres") == base / "nnUNetSynthBank_ldm_3d_fullres"
    assert bank_dir(phantom_ct, "ldm", "3d_fullres", shapes={}) == bank_dir(phantom_ct, "ldm", "3d_fullres")
    assert bank_dir(phantom_ct, "ldm", "3d_fullres", shapes={"size_class": None, "deformation": None}) == \
        base / "nnUNetSynthBank_ldm_3d_fullres"
    assert bank_dir(phantom_ct, "ldm", "3d_fullres", shapes={"size_class": "tiny"}) == \
        base / "nnUNetSynthBank_ldm_3d_fullres_tiny"
    assert bank_dir(phantom_ct, "ddpm", "3d_fullres", shapes={"deformation": "simplex"}) == \
        base / "nnUNetSynthBank_ddpm_3d_fullres_simplex"
    # always preset, class, deformation, whatever the order given
    assert bank_dir(phantom_ct, "ldm", "3d_fullres", shapes={"deformation": "simplex", "size_class": "tiny"}) == \
        base / "nnUNetSynthBank_ldm_3d_fullres_tiny_simplex"
    assert bank_dir(phantom_ct, "ldm", "3d_fullres", "nnUNetResEncUNetMPlans",
                    {"size_preset": "quartile", "size_class": "tiny"}) == \
        base / "nnUNetSynthBank_ldm_nnUNetResEncUNetMPlans_3d_fullres_quartile_tiny"
    # every transplant bank has template masks: the name does not repeat it
    assert bank_suffix("transplant", {"deformation": "template"}) == ""
    assert bank_suffix("ldm", {"deformation": "template"}) == "_template"
    with pytest.raises(ValueError, match="size_preset, size_class, deformation; got size"):
        bank_suffix("ldm", {"size": "tiny"})
    with pytest.raises(ValueError, match="cannot name a bank folder"):
        bank_suffix("ldm", {"size_class": "../tiny"})


def test_generate_command_carries_the_shape_flags():
    plain = "nnUNetv2_synth_generate -d D -g ldm -c 3d_fullres -f 0 -n N"
    assert generate_command("D", "ldm", "3d_fullres", 0) == plain
    assert generate_command("D", "ldm", "3d_fullres", 0, shapes={"deformation": "simplex", "size_class": "tiny"}) == \
        "nnUNetv2_synth_generate -d D -g ldm -c 3d_fullres -f 0 -n N --size-class tiny --deformation simplex"


def test_shaped_bank_has_its_folder_manifest_and_only_lesions_of_its_class(phantom_ct, study_bank):
    assert study_bank.name == FOLDER
    train, _, _ = split_cases(phantom_ct, "3d_fullres", 0)
    ids = bank_identifiers(study_bank, 0)
    assert len(ids) == BANK_CASES
    default = bank_dir(phantom_ct, "analytic", "3d_fullres")
    assert not any((default / f"{i}.b2nd").exists() or list(default.glob(f"{i}.*")) for i in ids), \
        "the shaped bank's cases went into the default bank's folder"

    manifest = json.loads((study_bank / MANIFEST_DIR / "fold_0.json").read_text(encoding="utf-8"))
    assert manifest["shape_overrides"] == SHAPES
    assert {k: manifest["shapes"][k] for k in SHAPES} == SHAPES
    assert set(manifest["training_cases"]) == set(train)

    plan = bank_plan(phantom_ct, "analytic", "3d_fullres", shapes=SHAPES)
    radii = class_radii_mm(plan)
    spread = 0.25  # axes ~ U(0.75 r, 1.25 r) of the class radius (nnunet_synth.generators.sizes)
    tiny = (1 - spread) * radii["tiny"], (1 + spread) * radii["tiny"]
    # the check can tell tiny from the other classes: their ranges do not reach into tiny's
    assert all((1 - spread) * radii[c] > tiny[1] for c in ("small", "medium", "large")), radii
    dataset = infer_dataset_class(str(study_bank))(str(study_bank), ids)
    for identifier in ids:
        _, _, _, properties = dataset.load_case(identifier)
        lesions = properties["synth"]["lesions"]
        assert lesions, identifier
        for lesion in lesions:
            assert lesion["size_class"] == "tiny", (identifier, lesion)
            # shrunk to fit is allowed, larger than tiny is not
            assert max(lesion["semi_axes_mm"]) <= tiny[1] + 1e-6, (identifier, lesion, tiny)
    assert "holds 3 of the 3 cases requested" in check_bank(phantom_ct, "analytic", "3d_fullres", 0, shapes=SHAPES)


def test_study_trainer_mixes_its_own_bank(phantom_ct, study_bank):
    trainer = _trainer(TinySimplexAnalyticBank, phantom_ct)
    assert trainer.bank_folder == study_bank
    dataset_tr, _ = trainer.get_tr_and_val_datasets()
    mixed = [i for i in dataset_tr.identifiers if is_bank_identifier(i)]
    assert sorted(mixed) == sorted(bank_identifiers(study_bank, 0))
    probabilities = np.asarray(trainer.bank_sampling_probabilities)
    is_bank = np.array([is_bank_identifier(i) for i in dataset_tr.identifiers])
    assert probabilities[is_bank].sum() == pytest.approx(0.2)


@pytest.mark.parametrize("name, flags", [
    ("nnUNetTrainerSynth20TinyLDM", "-g ldm -c 3d_fullres -f 0 -n N --size-class tiny"),
    ("nnUNetTrainerSynth20SimplexDDPM", "-g ddpm -c 3d_fullres -f 0 -n N --deformation simplex"),
])
def test_study_trainer_without_its_bank_names_the_command(phantom_ct, name, flags):
    trainer = _trainer(getattr(trainers, name), phantom_ct)
    folder = trainer.bank_folder
    assert not folder.exists()
    with pytest.raises(RuntimeError, match=rf"{name} trains on the .* bank of shapes .*{folder.name}, which does not "
                                           rf"exist.*Make it with: nnUNetv2_synth_generate -d Dataset901_PhantomCT "
                                           rf"{flags}$"):
        trainer.get_tr_and_val_datasets()


def test_bank_made_before_the_naming_is_refused_and_sent_to_its_folder(phantom_ct, study_bank):
    """A bank made with --size-class tiny into the default folder (before folders carried the shapes) is not the
    default bank: the trainer of the plan's shapes refuses it and names the folder it belongs in."""
    default = bank_dir(phantom_ct, "analytic", "3d_fullres")
    path = default / MANIFEST_DIR / f"fold_{LEGACY_FOLD}.json"
    manifest = json.loads((study_bank / MANIFEST_DIR / "fold_0.json").read_text(encoding="utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(manifest, fold=LEGACY_FOLD)), encoding="utf-8")
    try:
        with pytest.raises(BankError, match=rf"generated with --size-preset labelfree --size-class tiny --deformation "
                                            rf"simplex, not with the synth plan shapes.*move it to .*{FOLDER}"):
            check_bank(phantom_ct, "analytic", "3d_fullres", LEGACY_FOLD)
    finally:
        path.unlink()


@pytest.mark.parametrize("name", list(STUDY_TRAINERS))
def test_named_study_trainers(name):
    backend, shapes = STUDY_TRAINERS[name]
    cls = getattr(trainers, name)
    assert name in trainers.__all__
    assert issubclass(cls, nnUNetTrainerSynthBank) and cls.synth_backend == backend
    assert cls.synth_shapes == shapes and cls.synth_probability == 0.2
    family = trainers.nnUNetTrainerSynth20LDM if backend == "ldm" else trainers.nnUNetTrainerSynth20DDPM
    assert issubclass(cls, family)
