"""The breast 2D paper's and the liver-MRI paper's experiments as the papers ran them (issue 13), on a 2d-planned
CT phantom with a tiny Stable Diffusion pipeline built from small configs:

- the 2D bank's samples are its synthetic slices, so the share of synthetic slices is N/100;
- size captions count tumour pixels on the image the model sees (the paper's 512 x 512 bins);
- the "no tumor" caption trains on tumour-free slices, also where only tumours are labelled; targets are healthy;
- ``bank_cases: K`` mixes exactly K bank cases into the real ones (the synthetic-count study).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnunet_synth.bank import bank_identifiers, generate_bank, is_bank_identifier, parse_bank_identifier
from nnunet_synth.generator_training import main as train_main
from nnunet_synth.generators import get_backend
from nnunet_synth.generators.paths import bank_dir, generator_output_dir
from nnunet_synth.generators.sd_inversion.captions import caption, caption_of_mask, model_area
from nnunet_synth.generators.sd_inversion.tiny import build_tiny_base_model
from nnunet_synth.generators.sd_inversion.training import FixedLoss, SliceSource
from nnunet_synth.generators.splits import split_cases
from nnunet_synth.planning import load_synth_plan, preprocessed_dir
from nnunet_synth.synth_plan import SynthPlan, SynthPlanError, synth_plan_file
from nnunet_synth.trainers import nnUNetTrainerSynth20DDPM, nnUNetTrainerSynth20SD
from nnunet_synth.trainers.bank import SyntheticSlices, synthetic_slices

from .conftest import ct_phantom_2d

DATASET = 913
TUMOUR = 2
RESOLUTION = 32
BANK_CASES = 4
STEPS = 4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantom_2d(nnunet_dirs) -> int:
    """The CT phantom (organ 1, tumour 2) planned and preprocessed for the 2d configuration."""
    return ct_phantom_2d(DATASET, seed=13)


@pytest.fixture(scope="module")
def generator(phantom_2d, tmp_path_factory) -> Path:
    """A tiny base model with LoRA fine-tuned for two iterations on fold 0 (enough to generate a bank)."""
    base_model = build_tiny_base_model(tmp_path_factory.mktemp("sd") / "tiny_sd", resolution=RESOLUTION)
    train_main(["-d", str(phantom_2d), "-g", "sd_inversion", "-c", "2d", "--preset", "tiny", "--iterations", "2",
                "-device", "cpu", "--base-model", str(base_model)])
    return generator_output_dir(phantom_2d, "sd_inversion", "2d", 0)


@pytest.fixture(scope="module")
def bank(phantom_2d, generator) -> Path:
    written = generate_bank(phantom_2d, "sd_inversion", BANK_CASES, configuration="2d", sampling_steps=STEPS,
                            device="cpu", progress=False)
    assert len(written) >= 3, written  # a case may be skipped where no lesion fits its source case
    return bank_dir(phantom_2d, "sd_inversion", "2d")


def _trainer(cls, dataset: int):
    base = preprocessed_dir(dataset)
    plans = dict(load_json(base / "nnUNetPlans.json"), continue_training=False)
    trainer = cls(plans, "2d", 0, load_json(base / "dataset.json"), torch.device("cpu"))
    trainer.initialize()
    return trainer


@contextmanager
def _plan_setting(dataset: int, **settings):
    """The dataset's synth plan file with top-level ``settings``, restored afterwards."""
    path = synth_plan_file(preprocessed_dir(dataset))
    load_synth_plan(dataset, "2d")  # made with defaults where missing
    original = path.read_text(encoding="utf-8")
    path.write_text(json.dumps({**json.loads(original), **settings}), encoding="utf-8")
    try:
        yield
    finally:
        path.write_text(original, encoding="utf-8")


def _changed_values(bank: Path, dataset: int) -> dict[str, np.ndarray]:
    """Per bank case, the values of the pixels the generator changed (all in its synthetic slice): a drawn
    sample holding any of them is that synthetic slice."""
    _, _, real_folder = split_cases(dataset, "2d", 0)
    real, synthetic = nnUNetDatasetBlosc2(str(real_folder)), nnUNetDatasetBlosc2(str(bank))
    out = {}
    for identifier in bank_identifiers(bank, 0):
        data = np.asarray(synthetic.load_case(identifier)[0])
        source = np.asarray(real.load_case(parse_bank_identifier(identifier)[0])[0])
        out[identifier] = data[data != source]
        assert out[identifier].size, identifier
    return out


# -- 1. the 2D bank's samples are synthetic slices, at the share N/100 --------------------------------------------

def test_bank_records_the_synthetic_slices_of_each_case(phantom_2d, bank):
    _, _, real_folder = split_cases(phantom_2d, "2d", 0)
    real, synthetic = nnUNetDatasetBlosc2(str(real_folder)), nnUNetDatasetBlosc2(str(bank))
    healthy_targets, ids = 0, bank_identifiers(bank, 0)
    for identifier in ids:
        _, seg, _, props = synthetic.load_case(identifier)
        seg0 = np.asarray(real.load_case(parse_bank_identifier(identifier)[0])[1])
        lesion = (np.asarray(seg)[0] == TUMOUR) & (seg0[0] != TUMOUR)
        assert props["synth"]["synthetic_slices"] == [int(z) for z in np.flatnonzero(lesion.any(axis=(1, 2)))]
        assert props["synth"]["synthetic_slices"] == [props["synth"]["slice"]] == synthetic_slices(props)
        healthy_targets += not (seg0[0, props["synth"]["slice"]] == TUMOUR).any()
    # the paper inserts into healthy slices: those without real tumour come first (a slice with tumour only where
    # the lesion fits none of them, see generators.lesions.insert_tumours_in_case)
    assert healthy_targets >= len(ids) / 2, (healthy_targets, len(ids))


def test_synthetic_slices_view_keeps_only_the_synthetic_slice(bank):
    raw = nnUNetDatasetBlosc2(str(bank))
    view = SyntheticSlices(raw)
    for identifier in view.identifiers:
        data, seg, _, props = raw.load_case(identifier)
        (z,) = props["synth"]["synthetic_slices"]
        cut, cut_seg, _, cut_props = view.load_case(identifier)
        assert np.array_equal(cut, np.asarray(data)[:, z:z + 1])
        assert np.array_equal(cut_seg, np.asarray(seg)[:, z:z + 1])
        tumour = np.asarray(cut_props["class_locations"][TUMOUR])
        assert len(tumour) and (tumour[:, 1] == 0).all() and (cut_seg[tuple(tumour.T)] == TUMOUR).all()
        kept = np.asarray(props["class_locations"][TUMOUR])
        assert len(tumour) == int((kept[:, 1] == z).sum())
    with pytest.raises(RuntimeError, match="records no synthetic slice"):
        synthetic_slices({"synth": {"slice": None}}, "case_x")


def test_synth20sd_2d_samples_synthetic_slices_at_twenty_percent(phantom_2d, bank, monkeypatch):
    """Over many draws of nnU-Net's 2d loader, the share of samples that are a synthetic slice is N/100 (before,
    a drawn bank case gave one of its ~20 slices: a share near 1%)."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = _trainer(nnUNetTrainerSynth20SD, phantom_2d)
    train_loader, _ = trainer.get_dataloaders()
    loader = train_loader.data_loader
    loader.transforms = None  # raw crops: a synthetic slice's sample holds the generator's values
    changed = _changed_values(bank, phantom_2d)
    rng_state = np.random.get_state()
    np.random.seed(0)  # nnU-Net's loader draws cases and crops from numpy's global generator
    try:
        synthetic, total = 0, 0
        while total < 2000:
            batch = loader.generate_train_batch()
            for key, sample in zip(batch["keys"], batch["data"].numpy()):
                total += 1
                synthetic += bool(is_bank_identifier(key) and np.isin(changed[key], sample).any())
    finally:
        np.random.set_state(rng_state)
    share = synthetic / total
    assert 0.15 <= share <= 0.25, share
    assert abs(share - 0.2) < 4 * np.sqrt(0.2 * 0.8 / total), share
    line = trainer.bank_share_line(200, 41)
    assert "synthetic-slice share 20.5%; target 20.0%" in line and line.startswith("bank cases this epoch")


def test_epoch_log_counts_bank_cases_where_samples_are_not_slices(phantom_2d, bank, monkeypatch):
    """Only 2d configurations serve synthetic slices; the log of a 3D configuration counts bank cases."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = _trainer(nnUNetTrainerSynth20SD, phantom_2d)
    assert trainer.samples_synthetic_slices
    monkeypatch.setattr(type(trainer), "samples_synthetic_slices", property(lambda self: False))
    assert trainer.bank_share_line(10, 2) == "bank cases this epoch: 2/10 samples (20.0%; target 20.0%)"


# -- 2. size captions in the pixels of the image the model sees ----------------------------------------------------

def test_size_bins_count_pixels_of_the_model_image():
    mask = np.zeros((64, 48), dtype=bool)
    mask[10:20, 10:25] = True  # 150 slice pixels: tiny on the slice; x 64 at 512 x 512
    assert caption_of_mask(mask) == caption("tiny")
    assert model_area(mask, 512) == pytest.approx(150 * 64, rel=0.02)
    assert caption_of_mask(mask, resolution=512) == caption("very_large")
    # a 512 x 512 slice is the model's image: the same pixels
    full = np.zeros((512, 512), dtype=bool)
    full[100:110, 100:130] = True
    assert model_area(full, 512) == 300 and caption_of_mask(full, resolution=512) == caption("small")
    # a tumour that shrinks below a pixel is still a tumour
    big = np.zeros((2048, 2048), dtype=bool)
    big[5, 5] = True
    assert model_area(big, 512) == 1 and caption_of_mask(big, resolution=512) == caption("tiny")
    assert model_area(np.zeros((8, 8), dtype=bool), 512) == 0


class _Cases:
    """A stand-in for nnU-Net's dataset: (data, seg, None, properties) per case."""

    def __init__(self, segs: dict[str, np.ndarray]):
        self.segs = segs

    def load_case(self, case: str):
        seg = self.segs[case]
        return np.zeros((1, *seg.shape), dtype=np.float32), seg[None], None, {}


def test_training_captions_count_tumour_area_at_the_model_resolution():
    seg = np.zeros((3, 64, 64), dtype=np.int16)
    seg[:, 5:60, 5:60] = 1
    seg[1, 10:20, 10:25] = TUMOUR  # 150 slice pixels, 9600 at 512
    source = SliceSource(_Cases({"a": seg}), ["a"], TUMOUR, 0.5, organ_label=1, resolution=512)
    assert [(z, area) for _, z, area in source.tumour] == [(1, model_area(seg[1] == TUMOUR, 512))]
    fixed = FixedLoss(source, [[0.0, 1.0]], 512, seed=0, samples=12)
    assert caption("very_large") in fixed.prompts and caption("tiny") not in fixed.prompts


def test_generator_prompts_the_size_class_of_the_model_image(phantom_2d, generator):
    state = torch.load(generator / "checkpoint_final.pth", weights_only=False)
    assert state["config"]["caption_resolution"] == RESOLUTION
    plan = load_synth_plan(phantom_2d, "2d").replace(backend="sd_inversion",
                                                     backend_params={"device": "cpu", "sampling_steps": STEPS})
    backend = get_backend("sd_inversion")(plan)
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:30, 5:15] = True  # 250 slice pixels (small); the 40 x 40 slice is 32 x 32 for the model: 160 (tiny)
    assert caption_of_mask(mask) == caption("small")
    assert backend.target_prompt(mask) == caption("tiny")


# -- 3. "no tumor" trains on tumour-free slices -------------------------------------------------------------------

def test_no_tumour_caption_trains_on_tumour_free_slices_without_an_organ_label():
    """A breast-style dataset labels only tumours (1): its tumour-free slices still train "no tumor"."""
    segs = {}
    for i, case in enumerate(["a", "b"]):
        seg = np.zeros((6, 32, 32), dtype=np.int16)
        seg[2 + i:4 + i, 10:16, 10:16] = 1
        segs[case] = seg
    source = SliceSource(_Cases(segs), ["a", "b"], 1, 0.5)
    assert source.counts() == {"tumour_slices": 4, "no_tumour_slices": 8}
    assert sorted((c, z) for c, z, _ in source.plain) == [("a", z) for z in (0, 1, 4, 5)] + \
        [("b", z) for z in (0, 1, 2, 5)]
    drawn = [source.draw(np.random.default_rng([7, k]))[2] for k in range(200)]
    assert 60 < sum(area == 0 for area in drawn) < 140  # both captions train, at the tumour share
    # with an organ label, tumour-free slices are the organ's (the insertion targets), not empty ones
    for seg in segs.values():
        organ = seg[1:5]
        organ[organ == 0] = 3
    source = SliceSource(_Cases(segs), ["a", "b"], 1, 0.5, organ_label=3)
    assert sorted((c, z) for c, z, _ in source.plain) == [("a", 1), ("a", 4), ("b", 1), ("b", 2)]


def test_generator_trained_on_tumour_free_slices_of_its_fold(phantom_2d, generator):
    config = torch.load(generator / "checkpoint_final.pth", weights_only=False)["config"]
    train, val, _ = split_cases(phantom_2d, "2d", 0)
    assert config["train_cases"] == train and not set(val) & set(train)
    assert config["no_tumour_slices"] > 0 and config["tumour_slices"] > 0


# -- 4. a fixed number of bank cases (the synthetic-count study) --------------------------------------------------

def test_bank_cases_is_a_validated_plan_field(phantom_2d):
    plan = load_synth_plan(phantom_2d, "2d")
    flat = plan.to_dict()
    assert SynthPlan.from_dict({**flat, "bank_cases": 150}).bank_cases == 150
    assert SynthPlan.from_dict(flat).bank_cases is None
    for bad in (-1, 1.5, "300", True):
        with pytest.raises(SynthPlanError, match="'bank_cases'"):
            SynthPlan.from_dict({**flat, "bank_cases": bad})


def test_trainer_mixes_exactly_bank_cases_cases(phantom_2d, bank, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    train, _, _ = split_cases(phantom_2d, "2d", 0)
    everything = sorted(bank_identifiers(bank, 0), key=lambda i: parse_bank_identifier(i)[2])
    with _plan_setting(phantom_2d, bank_cases=2):
        trainer = _trainer(nnUNetTrainerSynth20SD, phantom_2d)  # the bank stays usable: a count is no bank setting
        train_loader, _ = trainer.get_dataloaders()
    loader = train_loader.data_loader
    in_loader = [i for i in loader.indices if is_bank_identifier(i)]
    assert in_loader == everything[:2]  # the first by index: a larger count holds a smaller one's cases
    assert trainer.synth_probability == pytest.approx(2 / (2 + len(train)))
    np.random.seed(1)
    keys = np.concatenate([loader.get_indices() for _ in range(600)])
    drawn = {k for k in keys if is_bank_identifier(k)}
    assert drawn == set(everything[:2])
    p = 2 / (2 + len(train))  # every case alike
    assert abs(np.mean([is_bank_identifier(k) for k in keys]) - p) < 4 * np.sqrt(p * (1 - p) / len(keys))


def test_bank_cases_beyond_the_bank_and_zero(phantom_2d, bank, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    held = len(bank_identifiers(bank, 0))
    with _plan_setting(phantom_2d, bank_cases=held + 1):
        trainer = _trainer(nnUNetTrainerSynth20SD, phantom_2d)
        with pytest.raises(RuntimeError, match=f"bank_cases={held + 1}.*holds {held}.*-n {held + 1}"):
            trainer.get_tr_and_val_datasets()
    with _plan_setting(phantom_2d, bank_cases=0):
        # the count study's baseline needs no bank at all (here: a DDPM one that was never made)
        trainer = _trainer(nnUNetTrainerSynth20DDPM, phantom_2d)
        train_loader, _ = trainer.get_dataloaders()
    assert not any(map(is_bank_identifier, train_loader.data_loader.indices))
    assert trainer.synth_probability == 0.0

