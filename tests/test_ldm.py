"""The ldm backend (breast SynBT paper) end to end on the CT phantom with the tiny preset: the three training
stages (reconstruction error and diffusion loss fall, patch-to-volume decoding without grid artefacts, per-stage
resume), checkpoint checks, the bank (changes only near the lesion), the LDM bank trainers (ratio) and the
online trainers (refuse without CUDA; their batch inpainting, called directly on CPU)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from scipy.ndimage import binary_dilation

from nnunet_synth.bank import bank_identifiers, generate_bank, is_bank_identifier, parse_bank_identifier
from nnunet_synth.generator_training import main as train_main
from nnunet_synth.generators import get_backend
from nnunet_synth.generators.checkpoints import GeneratorCheckpointError
from nnunet_synth.generators.ldm.backend import load_models
from nnunet_synth.generators.ldm.model import PRESETS, build_sampling_scheduler, build_unet, build_vqvae, get_preset
from nnunet_synth.generators.ldm.online import inpaint_batch
from nnunet_synth.generators.ldm.sampling import LDMModels, decode_volume, encode_volume, soft_mask
from nnunet_synth.generators.ldm.training import stage_dir
from nnunet_synth.generators.paths import bank_dir, generator_output_dir
from nnunet_synth.generators.splits import split_cases
from nnunet_synth.planning import load_synth_plan, preprocessed_dir
from nnunet_synth.synth_plan import SynthPlan
from nnunet_synth.trainers import (
    nnUNetTrainerSynth20LDM,
    nnUNetTrainerSynth20LDMOnline,
    nnUNetTrainerSynth60LDM,
    nnUNetTrainerSynth60LDMOnline,
)

from .conftest import cpu_trainer as _trainer

TUMOUR = 2
BANK_CASES = 3
SAMPLING_STEPS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def generator(phantom_ct, one_torch_thread) -> Path:
    """All three stages of the tiny LDM on fold 0 of the CT phantom (preset iteration counts)."""
    train_main(["-d", str(phantom_ct), "-g", "ldm", "--preset", "tiny", "-device", "cpu"])
    return generator_output_dir(phantom_ct, "ldm", "3d_fullres", 0)


@pytest.fixture(scope="module")
def bank(phantom_ct, generator) -> Path:
    written = generate_bank(phantom_ct, "ldm", BANK_CASES, sampling_steps=SAMPLING_STEPS, device="cpu",
                            progress=False)
    assert len(written) == BANK_CASES
    return bank_dir(phantom_ct, "ldm", "3d_fullres")


def _log(folder: Path) -> dict:
    return json.loads((folder / "training_log.json").read_text(encoding="utf-8"))


def test_paper_preset_matches_section_3_1_and_tiny_builds():
    paper = get_preset("paper")
    assert paper.vq_patch_size == (64, 64, 64) and paper.compression == 4
    assert paper.num_embeddings == 8192 and paper.embedding_dim == 8 and paper.vq_channels == (32, 64)
    assert paper.vq_learning_rate == 1e-4 and paper.vq_batch_size == 8
    assert paper.volume_learning_rate == 1e-5 and paper.volume_batch_size == 1 and paper.volume_iterations == 100_000
    assert paper.volume_size == (128, 192, 192) and paper.latent_volume == (32, 48, 48)
    assert paper.diffusion_iterations == 500_000 and paper.adversarial_weight == 0.01
    assert {"paper", "tiny"} <= set(PRESETS)
    with pytest.raises(KeyError, match="available: paper"):
        get_preset("huge")
    tiny = get_preset("tiny")
    vqvae = build_vqvae(tiny, num_channels=2).eval()
    latent = encode_volume(vqvae, torch.zeros(1, 2, *tiny.volume_size), tiny.vq_patch_size)
    assert latent.shape == (1, tiny.embedding_dim, *tiny.latent_volume)
    out = build_unet(tiny)(torch.zeros(1, 2 * tiny.embedding_dim + 1, *tiny.latent_volume), timesteps=torch.tensor([3]))
    assert out.shape == latent.shape
    # any volume size decodes (padded to whole tiles and cropped back)
    assert decode_volume(LDMModels(vqvae, None, tiny.vq_patch_size, 2), torch.zeros(1, 2, 9, 20, 17)).shape == \
        (1, 2, 9, 20, 17)


def test_soft_mask_is_one_inside_and_zero_beyond_the_margin():
    mask = torch.zeros(1, 1, 9, 9, 9)
    mask[0, 0, 4, 4, 4] = 1
    weight = soft_mask(mask, 2)[0, 0]
    assert weight[4, 4, 4] == 1 and weight[4, 4, 6] == pytest.approx(1 / 3) and weight[4, 4, 7] == 0
    assert (weight[:2] == 0).all() and (weight[7:] == 0).all()


def test_vqvae_reconstruction_error_falls(generator):
    log = _log(stage_dir(generator, "vqvae"))
    losses = np.asarray(log["train_loss"])
    assert len(losses) == get_preset("tiny").vq_iterations
    assert losses[-8:].mean() < 0.7 * losses[:8].mean(), losses
    val = [h["val_loss"] for h in log["history"]]
    assert val[-1] < val[0]
    for name in ("checkpoint_best.pth", "checkpoint_final.pth", "checkpoint_latest.pth", "progress.png"):
        assert (stage_dir(generator, "vqvae") / name).is_file(), name


def _seam_and_centre_error(models: LDMModels, volumes: list[np.ndarray], size: tuple[int, ...]) -> tuple[float, float]:
    """Mean absolute reconstruction error of patch-to-volume decoding on voxels next to an inner tile seam and on
    the other inner voxels, over crops of ``size`` at random offsets (so seams fall on every kind of content)."""
    rng = np.random.default_rng(0)
    errors = []
    with torch.no_grad():
        for _ in range(30):
            volume = volumes[rng.integers(len(volumes))]
            lower = [int(rng.integers(0, n - s + 1)) for n, s in zip(volume.shape[1:], size)]
            crop = torch.from_numpy(volume[(slice(None), *(slice(lo, lo + s) for lo, s in zip(lower, size)))].copy())
            errors.append((decode_volume(models, crop[None]) - crop[None]).abs()[0].mean(0).numpy())
    error = np.mean(errors, axis=0)
    seam = np.zeros(error.shape, dtype=bool)
    for axis, (n, tile) in enumerate(zip(error.shape, models.tile)):
        index = np.arange(n)
        near = ((index % tile == 0) | (index % tile == tile - 1)) & (index > 0) & (index < n - 1)
        seam |= np.expand_dims(near, [a for a in range(3) if a != axis])
    inner = np.zeros(error.shape, dtype=bool)
    inner[1:-1, 1:-1, 1:-1] = True  # the volume's own faces are not seams
    return float(error[seam & inner].mean()), float(error[~seam & inner].mean())


def test_volume_stage_decodes_large_volumes_without_grid_artefacts(phantom_ct, generator):
    tiny = get_preset("tiny")
    train, val, folder = split_cases(phantom_ct, "3d_fullres", 0)
    dataset = nnUNetDatasetBlosc2(str(folder))
    volumes = [np.asarray(dataset.load_case(c)[0], dtype=np.float32) for c in train]
    assert all(v > p for v, p in zip(tiny.volume_size, tiny.vq_patch_size)), "volumes span several tiles"
    results = {}
    for stage in ("vqvae", "vqvae-volume"):
        vqvae = build_vqvae(tiny, 1)
        state = torch.load(stage_dir(generator, stage) / "checkpoint_best.pth", weights_only=False)
        vqvae.load_state_dict(state["vqvae"])
        models = LDMModels(vqvae.eval(), None, tiny.vq_patch_size, tiny.compression, halo=tiny.encode_halo)
        results[stage] = _seam_and_centre_error(models, volumes, tiny.volume_size)
    seam, centre = results["vqvae-volume"]
    assert seam <= centre, results
    # the volume-tuned decoder decodes the seams better than the patch-trained one (its share of the seams relative
    # to the centres depends on the phantom's draw at these few iterations, so it is not compared)
    assert seam < results["vqvae"][0], results
    assert centre < results["vqvae"][1], results
    # stage 2 tuned the decoder only: encoder and codebook are stage 1's
    first = torch.load(stage_dir(generator, "vqvae") / "checkpoint_best.pth", weights_only=False)["vqvae"]
    second = torch.load(stage_dir(generator, "vqvae-volume") / "checkpoint_best.pth", weights_only=False)["vqvae"]
    for key, value in first.items():
        if not key.startswith("decoder."):
            assert torch.equal(value, second[key]), key
    assert any(not torch.equal(v, second[k]) for k, v in first.items() if k.startswith("decoder."))


def test_diffusion_loss_falls_and_the_checkpoint_holds_everything(phantom_ct, generator):
    log = _log(generator)
    losses = np.asarray(log["train_loss"])
    assert len(losses) == get_preset("tiny").diffusion_iterations
    assert losses[-8:].mean() < 0.7 * losses[:8].mean(), losses
    config = log["config"]
    train, val, _ = split_cases(phantom_ct, "3d_fullres", 0)
    assert set(config["train_cases"]) | set(config["val_cases"]) <= set(train)
    assert not set(config["train_cases"]) & set(config["val_cases"])
    models, config = load_models(generator / "checkpoint_best.pth")
    assert models.unet is not None and config["scale_factor"] > 0 and config["stage"] == "diffusion"
    text = (generator / "training_log.txt").read_text(encoding="utf-8")
    assert all(f"[{s}] finished" in text for s in ("vqvae", "vqvae-volume", "diffusion"))


def test_stages_resume_and_need_their_predecessor(phantom_ct, generator, capsys):
    # fold 1 keeps the fold-0 generator of the other tests untouched
    args = ["-d", str(phantom_ct), "-g", "ldm", "--preset", "tiny", "-device", "cpu", "-f", "1"]
    out = generator_output_dir(phantom_ct, "ldm", "3d_fullres", 1)
    with pytest.raises(SystemExit) as exit_info:  # a user error: one line, exit status 2
        train_main(args + ["--stage", "vqvae-volume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert re.search(r"nnUNetv2_synth_train_generator: error: .*stage_vqvae/checkpoint_best.pth does not exist.*"
                     r"-g ldm -c 3d_fullres -f 1 --stage vqvae", err), err
    with pytest.raises(SystemExit):
        train_main(args + ["--stage", "decoder"])
    train_main(args + ["--stage", "vqvae", "--iterations", "4"])
    straight = torch.load(stage_dir(out, "vqvae") / "checkpoint_final.pth", weights_only=False)
    shutil.rmtree(out)
    train_main(args + ["--stage", "vqvae", "--iterations", "2"])
    train_main(args + ["--stage", "vqvae", "--iterations", "4", "--c"])
    resumed = torch.load(stage_dir(out, "vqvae") / "checkpoint_final.pth", weights_only=False)
    assert resumed["iteration"] == 4 and resumed["train_loss"] == straight["train_loss"]
    for key, value in straight["vqvae"].items():
        assert torch.allclose(resumed["vqvae"][key], value, rtol=1e-5, atol=1e-6), key
    # all stages with --c: the finished vqvae stage is skipped, the others start from their predecessor
    train_main(args + ["--iterations", "2", "--c"])
    text = (out / "training_log.txt").read_text(encoding="utf-8")
    assert "[vqvae] already finished" in text and "[diffusion] finished at iteration 2" in text
    assert torch.load(stage_dir(out, "vqvae") / "checkpoint_final.pth", weights_only=False)["iteration"] == 4


def test_optional_adversarial_loss_trains_a_discriminator(phantom_ct, generator, monkeypatch):
    import dataclasses

    monkeypatch.setitem(PRESETS, "tiny", dataclasses.replace(get_preset("tiny"), adversarial_weight=0.01,
                                                             adversarial_start=1))
    args = ["-d", str(phantom_ct), "-g", "ldm", "--preset", "tiny", "-device", "cpu", "-f", "2", "--iterations", "3"]
    out = generator_output_dir(phantom_ct, "ldm", "3d_fullres", 2)
    for stage in ("vqvae", "vqvae-volume"):
        train_main(args + ["--stage", stage])
        state = torch.load(stage_dir(out, stage) / "checkpoint_final.pth", weights_only=False)
        assert "discriminator" in state and "optimizer_discriminator" in state
        assert state["config"]["preset_params"]["adversarial_weight"] == 0.01


def _plan(phantom_ct, **params) -> SynthPlan:
    plan = load_synth_plan(phantom_ct, "3d_fullres")
    return plan.replace(backend="ldm", backend_params={"device": "cpu", "sampling_steps": 2, **params})


def test_checkpoint_errors_name_the_file_and_the_mismatch(phantom_ct, generator):
    ldm = get_backend("ldm")
    assert ldm(_plan(phantom_ct)).checkpoint == generator / "checkpoint_best.pth"
    assert ldm(_plan(phantom_ct)).sampling_steps == 2
    stage1 = stage_dir(generator, "vqvae") / "checkpoint_best.pth"
    with pytest.raises(GeneratorCheckpointError, match="from the ldm stage 'vqvae'.*diffusion stage"):
        ldm(_plan(phantom_ct, checkpoint=str(stage1)))
    plan = _plan(phantom_ct, checkpoint=str(generator / "checkpoint_best.pth")).replace(dataset_name="Dataset942_Other")
    with pytest.raises(GeneratorCheckpointError, match="checkpoint_best.pth does not fit.*Dataset942_Other"):
        ldm(plan)
    with pytest.raises(GeneratorCheckpointError, match="fold_4/checkpoint_best.pth does not exist.*-g ldm"):
        ldm(_plan(phantom_ct, fold=4))


def test_bank_case_differs_from_its_source_only_near_the_lesion(phantom_ct, bank):
    margin = get_preset("tiny").blend_margin
    train, _, real_folder = split_cases(phantom_ct, "3d_fullres", 0)
    real, synthetic = nnUNetDatasetBlosc2(str(real_folder)), nnUNetDatasetBlosc2(str(bank))
    ids = bank_identifiers(bank, 0)
    assert len(ids) == BANK_CASES
    for identifier in ids:
        source, fold, _ = parse_bank_identifier(identifier)
        assert fold == "0" and source in train
        data, seg, _, props = synthetic.load_case(identifier)
        data0, seg0, _, _ = real.load_case(source)
        data, seg, data0, seg0 = (np.asarray(a) for a in (data, seg, data0, seg0))
        lesion = (seg[0] == TUMOUR) & (seg0[0] != TUMOUR)
        assert lesion.sum() == sum(item["voxels"] for item in props["synth"]["lesions"]) > 0
        assert np.array_equal(seg[0][~lesion], seg0[0][~lesion])
        near = binary_dilation(lesion, np.ones((3, 3, 3), bool), iterations=margin)
        changed = (data != data0)[0]
        assert not (changed & ~near).any(), "a voxel farther than the blend margin from the lesion changed"
        assert changed[lesion].mean() > 0.9
        assert props["synth"]["backend"] == "ldm" and props["synth"]["sampling_steps"] == SAMPLING_STEPS


def test_template_masks_in_the_ldm_bank(phantom_ct, generator):
    """The SynBT paper's template masks (real tumours of the fold's training cases) through the ldm bank."""
    from scipy.ndimage import label

    written = generate_bank(phantom_ct, "ldm", 2, fold=1, sampling_steps=SAMPLING_STEPS, device="cpu",
                            checkpoint=str(generator / "checkpoint_best.pth"), deformation="template", progress=False)
    assert len(written) == 2
    folder = bank_dir(phantom_ct, "ldm", "3d_fullres", shapes={"deformation": "template"})
    manifest = json.loads((folder / "manifest" / "fold_1.json").read_text(encoding="utf-8"))
    assert manifest["shapes"]["deformation"] == "template"
    synthetic = nnUNetDatasetBlosc2(str(folder))
    real = nnUNetDatasetBlosc2(str(split_cases(phantom_ct, "3d_fullres", 1)[2]))
    for identifier in written:
        _, seg, _, props = synthetic.load_case(identifier)
        seg0 = np.asarray(real.load_case(parse_bank_identifier(identifier)[0])[1])
        lesion = (np.asarray(seg)[0] == TUMOUR) & (seg0[0] != TUMOUR)
        assert lesion.any() and label(lesion, np.ones((3, 3, 3)))[1] == len(props["synth"]["lesions"])




@pytest.mark.parametrize("cls", [nnUNetTrainerSynth20LDM, nnUNetTrainerSynth60LDM])
def test_ldm_bank_trainer_reaches_its_ratio(phantom_ct, bank, monkeypatch, cls):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    train_loader, val_loader = _trainer(cls, phantom_ct).get_dataloaders()
    ids = train_loader.data_loader.indices
    train, val, _ = split_cases(phantom_ct, "3d_fullres", 0)
    assert {i for i in ids if not is_bank_identifier(i)} == set(train)
    assert sum(map(is_bank_identifier, ids)) == BANK_CASES
    p = cls.synth_probability
    samples = bank_samples = 0
    for _ in range(60):  # real batches through nnU-Net's loader and transforms
        keys = next(train_loader)["keys"]
        samples += len(keys)
        bank_samples += sum(is_bank_identifier(k) for k in keys)
    assert abs(bank_samples - p * samples) < 4 * np.sqrt(samples * p * (1 - p)), (bank_samples, samples)
    keys = np.concatenate([train_loader.data_loader.get_indices() for _ in range(10000)])
    assert abs(sum(map(is_bank_identifier, keys)) - p * len(keys)) < 4 * np.sqrt(len(keys) * p * (1 - p))
    assert not any(is_bank_identifier(k) for _ in range(5) for k in next(val_loader)["keys"])


@pytest.mark.parametrize("cls", [nnUNetTrainerSynth20LDMOnline, nnUNetTrainerSynth60LDMOnline])
def test_online_trainers_refuse_without_cuda(phantom_ct, cls):
    base = preprocessed_dir(phantom_ct)
    with pytest.raises(RuntimeError, match=rf"needs a CUDA device.*use the bank trainers.*-g ldm.*"
                                           rf"nnUNetTrainerSynth{round(100 * cls.synth_probability)}LDM$"):
        cls(load_json(base / "nnUNetPlans.json"), "3d_fullres", 0, load_json(base / "dataset.json"),
            torch.device("cpu"))


def test_online_trainer_step_inpaints_and_trains_on_cpu_when_allowed(phantom_ct, generator, monkeypatch):
    """The online trainer's own initialize and train_step, run on CPU with the CUDA refusal lifted."""

    class AllOnline(nnUNetTrainerSynth20LDMOnline):
        synth_probability = 1.0
        sampling_steps = 2

    monkeypatch.setattr(AllOnline, "_require_cuda", classmethod(lambda cls, device: None))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = _trainer(AllOnline, phantom_ct)
    assert trainer._ldm is not None and "LDM inpainting on the fly" in Path(trainer.log_file).read_text(
        encoding="utf-8")
    train_loader, _ = trainer.get_dataloaders()
    trainer.network.train()
    batch = next(train_loader)
    result = trainer.train_step(batch)
    assert np.isfinite(result["loss"])
    assert trainer._synth_seen == [len(batch["keys"])] * 2
    generation, step = trainer._seconds
    assert 0 < generation < step, "generation time is part of the training step's"


def test_online_inpainting_of_a_batch(phantom_ct, generator):
    """What the online trainers run in train_step, on CPU: a batch of phantom cases with deep-supervision targets."""
    models, config = load_models(generator / "checkpoint_best.pth")
    plan = load_synth_plan(phantom_ct, "3d_fullres")
    train, _, folder = split_cases(phantom_ct, "3d_fullres", 0)
    dataset = nnUNetDatasetBlosc2(str(folder))
    cases = [dataset.load_case(c) for c in train[:3]]
    data = torch.from_numpy(np.stack([np.asarray(c[0], dtype=np.float32) for c in cases]))
    seg = torch.from_numpy(np.stack([np.asarray(c[1], dtype=np.float32) for c in cases]))
    target = [seg, seg[:, :, ::2, ::2, ::2].clone()]
    scheduler = build_sampling_scheduler(2)

    same, same_target, none = inpaint_batch(models, scheduler, data, target, plan, 0.0, np.random.default_rng(0))
    assert none == [] and same is data and same_target is target
    out, out_target, chosen = inpaint_batch(models, scheduler, data, target, plan, 1.0, np.random.default_rng(0),
                                            torch.Generator().manual_seed(0), config["intensity_range"])
    assert chosen == [0, 1, 2]
    assert torch.equal(target[0], seg), "inputs are not modified"
    for b in chosen:
        lesion = ((out_target[0][b, 0] == TUMOUR) & (seg[b, 0] != TUMOUR)).numpy()
        assert lesion.sum() > 0
        assert ((out_target[1][b, 0] == TUMOUR) & (target[1][b, 0] != TUMOUR)).any(), "deep-supervision target"
        near = binary_dilation(lesion, np.ones((3, 3, 3), bool), iterations=models.blend_margin)
        changed = (out[b] != data[b]).any(0).numpy()
        assert changed[lesion].mean() > 0.9 and not (changed & ~near).any()
    again, _, _ = inpaint_batch(models, scheduler, data, target, plan, 1.0, np.random.default_rng(0),
                                torch.Generator().manual_seed(0), config["intensity_range"])
    assert torch.equal(again, out), "seeded"


@pytest.mark.slow
def test_ldm_bank_trainer_through_nnunetv2_train(phantom_ct, bank):
    from .conftest import NO_FINAL_VALIDATION, train_as_the_readme_says, training_log

    log = training_log(train_as_the_readme_says(phantom_ct, "3d_fullres", "nnUNetTrainerSynth20LDM_Debug",
                                                **NO_FINAL_VALIDATION))
    assert f"bank cases ({bank})" in log and "bank cases this epoch" in log
