"""The sd_inversion backend (breast 2D paper) end to end on a 2d-planned CT phantom with a tiny Stable Diffusion
pipeline built from small configs: captions, the base-model layout check, LoRA fine-tuning (only LoRA trains,
loss falls), edit-friendly DDPM inversion (exact reconstruction), insertion (only inside the smoothed mask),
the bank (--size-class) and the Synth*SD trainers (ratio, real-only fine-tuning)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnunet_synth.bank import bank_identifiers, generate_bank, is_bank_identifier, parse_bank_identifier
from nnunet_synth.bank import main as generate_main
from nnunet_synth.generator_training import main as train_main
from nnunet_synth.generators import get_backend
from nnunet_synth.generators.base import Lesion
from nnunet_synth.generators.checkpoints import GeneratorCheckpointError
from nnunet_synth.generators.paths import bank_dir, generator_output_dir
from nnunet_synth.generators.sd_inversion.captions import caption, caption_of_mask, size_class_of_area
from nnunet_synth.generators.sd_inversion.components import load_lora_state, load_parts, to_model
from nnunet_synth.generators.sd_inversion.insertion import smoothed_mask
from nnunet_synth.generators.sd_inversion.inversion import edit_timesteps, invert, regenerate
from nnunet_synth.generators.sd_inversion.tiny import build_tiny_base_model
from nnunet_synth.generators.splits import split_cases
from nnunet_synth.planning import load_synth_plan, preprocessed_dir
from nnunet_synth.synth_plan import SynthPlan
from nnunet_synth.trainers import (
    nnUNetTrainerSynth20SD,
    nnUNetTrainerSynth20SDRealFinetune,
    nnUNetTrainerSynth60SD,
)

from .conftest import (
    NO_FINAL_VALIDATION,
    ct_phantom_2d,
    plan_and_preprocess,
    run,
    train_as_the_readme_says,
    training_log,
)

DATASET = 905
TUMOUR = 2
ITERATIONS = 40
BANK_CASES = 3
SMALL = {"size_class": "small"}  # the fixture bank's shape setting
STEPS = 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantom_2d(nnunet_dirs) -> int:
    """The CT phantom planned and preprocessed for the 2d configuration (ID 905)."""
    return ct_phantom_2d(DATASET, seed=5)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    return build_tiny_base_model(tmp_path_factory.mktemp("sd") / "tiny_sd", resolution=32)


@pytest.fixture(scope="module")
def generator(phantom_2d, base_model) -> Path:
    """LoRA fine-tuned for a few dozen iterations on fold 0 of the 2d phantom."""
    train_main(["-d", str(phantom_2d), "-g", "sd_inversion", "-c", "2d", "--preset", "tiny", "--iterations",
                str(ITERATIONS), "-device", "cpu", "--base-model", str(base_model)])
    return generator_output_dir(phantom_2d, "sd_inversion", "2d", 0)


def _plan(dataset: int, **params) -> SynthPlan:
    plan = load_synth_plan(dataset, "2d")
    return plan.replace(backend="sd_inversion", backend_params={"device": "cpu", "sampling_steps": STEPS, **params})


def _trainer(cls, dataset: int, num_epochs: int | None = None):
    base = preprocessed_dir(dataset)
    plans = load_json(base / "nnUNetPlans.json")
    plans["continue_training"] = False
    t = cls(plans, "2d", 0, load_json(base / "dataset.json"), torch.device("cpu"))
    if num_epochs is not None:
        t.num_epochs = num_epochs
    t.initialize()
    return t


@pytest.mark.parametrize("area, size_class", [(0, "none"), (1, "tiny"), (199, "tiny"), (200, "small"),
                                              (399, "small"), (400, "medium"), (699, "medium"), (700, "large"),
                                              (1599, "large"), (1600, "very_large"), (5000, "very_large")])
def test_captions_follow_the_papers_area_bins(area, size_class):
    mask = np.zeros(100 * 100, dtype=bool)
    mask[np.random.default_rng(area).choice(mask.size, area, replace=False)] = True
    mask = mask.reshape(100, 100)
    assert size_class_of_area(int(mask.sum())) == size_class
    text = caption_of_mask(mask)
    assert text == caption(size_class) and text.startswith("2D axial MRI")
    assert ("no tumor" in text) == (area == 0)
    if area:
        assert size_class.replace("_", " ") + " tumor" in text
    assert not any(word in text.lower() for word in ("breast", "chest", "nipple"))


def test_without_a_base_model_the_command_names_the_layout(phantom_2d, tmp_path, capsys):
    args = ["-d", str(phantom_2d), "-g", "sd_inversion", "-c", "2d", "--preset", "tiny", "-device", "cpu", "-f", "4"]
    with pytest.raises(SystemExit) as exit_info:
        train_main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "needs --base-model PATH" in err
    assert all(part in err for part in ("unet/", "vae/", "text_encoder/", "tokenizer/", "scheduler/"))
    incomplete = tmp_path / "incomplete"
    (incomplete / "unet").mkdir(parents=True)
    with pytest.raises(SystemExit):
        train_main(args + ["--base-model", str(incomplete)])
    assert "lacks vae/, text_encoder/, tokenizer/, scheduler/" in capsys.readouterr().err


def test_lora_fine_tuning_trains_only_lora_and_its_loss_falls(phantom_2d, base_model, generator):
    parts = load_parts(base_model, lora_rank=4)
    trainable = [n for n, p in parts.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(p.requires_grad for m in (parts.vae, parts.text_encoder) for p in m.parameters())

    state = torch.load(generator / "checkpoint_final.pth", weights_only=False)
    assert state["lora"] and all("lora_" in k for k in state["lora"])  # only LoRA weights are stored
    assert "optimizer" not in state and "optimizer" in torch.load(generator / "checkpoint_latest.pth",
                                                                  weights_only=False)
    config = state["config"]
    assert config["base_model"] == str(base_model.resolve()) and config["resolution"] == 32
    assert config["lora_rank"] == 4 and config["tumour_slices"] > 0 and config["no_tumour_slices"] > 0
    train, val, _ = split_cases(phantom_2d, "2d", 0)
    assert config["train_cases"] == train and not set(val) & set(config["train_cases"])
    # the LoRA weights moved (B starts at zero), the base weights did not
    assert any(float(v.abs().max()) > 0 for k, v in state["lora"].items() if "lora_B" in k)
    fresh = dict(load_parts(base_model).unet.named_parameters())
    load_lora_state(parts.unet, state["lora"])
    for name, value in parts.unet.named_parameters():
        if "lora_" not in name:
            assert torch.equal(value, fresh[name.replace(".base_layer", "")]), name

    log = json.loads((generator / "training_log.json").read_text(encoding="utf-8"))
    assert len(log["train_loss"]) == ITERATIONS
    history = log["history"]
    assert [h["iteration"] for h in history] == [0, 10, 20, 30, 40]
    assert history[-1]["fixed_loss"] < 0.97 * history[0]["fixed_loss"], history
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "progress.png", "training_log.txt"):
        assert (generator / name).is_file(), name


def test_resumed_fine_tuning_continues_from_its_checkpoint(phantom_2d, base_model, generator):
    # fold 1 keeps the fold-0 generator of the other tests untouched
    args = ["-d", str(phantom_2d), "-g", "sd_inversion", "-c", "2d", "--preset", "tiny", "-device", "cpu", "-f", "1",
            "--base-model", str(base_model)]
    out = generator_output_dir(phantom_2d, "sd_inversion", "2d", 1)
    train_main(args + ["--iterations", "4"])
    straight = torch.load(out / "checkpoint_final.pth", weights_only=False)
    shutil.rmtree(out)
    train_main(args + ["--iterations", "2"])
    train_main(args + ["--iterations", "4", "--c"])
    resumed = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert resumed["iteration"] == 4 and resumed["train_loss"] == straight["train_loss"]
    for key, value in straight["lora"].items():
        assert torch.allclose(resumed["lora"][key], value, rtol=1e-5, atol=1e-7), key
    assert "resumed at iteration 2" in (out / "training_log.txt").read_text(encoding="utf-8")


@pytest.mark.slow
def test_fine_tuning_runs_distributed_under_torchrun(phantom_2d, base_model, generator):
    """Two gloo ranks on CPU (fold 2): both fine-tune, rank 0 writes, the LoRA replicas stay identical."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "nnunet_synth.generator_training",
         "-d", str(phantom_2d), "-g", "sd_inversion", "-c", "2d", "--preset", "tiny", "--iterations", "2",
         "-device", "cpu", "-f", "2", "-np", "0", "--base-model", str(base_model)], env=env, timeout=600)
    out = generator_output_dir(phantom_2d, "sd_inversion", "2d", 2)
    state = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert state["iteration"] == 2 and state["config"]["world_size"] == 2
    log = (out / "training_log.txt").read_text(encoding="utf-8")
    # an all_gather of both ranks' parameter sums after the last step
    assert "2 process(es)" in log and "parameters identical on all 2 ranks (unet)" in log


def test_inversion_then_regeneration_with_the_source_prompt_reconstructs_the_slice(base_model, generator):
    parts = load_parts(base_model, lora_rank=4)
    load_lora_state(parts.unet, torch.load(generator / "checkpoint_final.pth", weights_only=False)["lora"])
    timesteps = edit_timesteps(parts.scheduler, 50, 0.8)
    assert len(timesteps) == 40 and timesteps == sorted(timesteps, reverse=True)
    image = torch.rand(1, 1, 40, 36, generator=torch.Generator().manual_seed(0))
    pixels = to_model(image, 32)
    latents = parts.encode_images(pixels)
    prompts = parts.encode_prompts([caption("none"), ""])
    trajectory = invert(parts.unet, parts.scheduler, latents, prompts[:1], prompts[1:], 3.5, timesteps,
                        torch.Generator().manual_seed(1))
    back = regenerate(parts.unet, parts.scheduler, trajectory, prompts[:1], prompts[1:], 3.5)
    assert float((back - latents).abs().max()) < 1e-3 * float(latents.abs().max())
    # in image space the only error left is the VAE's own
    assert float((parts.decode_latents(back) - parts.decode_latents(latents)).abs().max()) < 1e-3
    # another prompt and guidance change the result
    edited = regenerate(parts.unet, parts.scheduler, trajectory, parts.encode_prompts([caption("large")]),
                        prompts[1:], 5.0)
    assert float((edited - latents).abs().max()) > 1e-2 * float(latents.abs().max())


def test_reverse_step_is_diffusers_ddpm_step(base_model):
    from diffusers.utils.torch_utils import randn_tensor

    from nnunet_synth.generators.sd_inversion.inversion import posterior_mean

    scheduler = load_parts(base_model).scheduler
    timesteps = edit_timesteps(scheduler, 20, 1.0)
    x, out = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    for i, t in enumerate(timesteps[:-1]):
        ours = posterior_mean(scheduler, out, t, timesteps[i + 1], x)
        assert scheduler.previous_timestep(t) == timesteps[i + 1]
        noise = randn_tensor(x.shape, generator=torch.Generator().manual_seed(i))
        ours = ours + scheduler._get_variance(t) ** 0.5 * noise
        theirs = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-5), t


def test_insertion_changes_pixels_only_inside_the_smoothed_mask(phantom_2d, generator):
    backend = get_backend("sd_inversion")(_plan(phantom_2d))
    assert backend.checkpoint == generator / "checkpoint_final.pth"
    train, _, folder = split_cases(phantom_2d, "2d", 0)
    data = np.asarray(nnUNetDatasetBlosc2(str(folder)).load_case(train[0])[0], dtype=np.float32)
    image = data[:, data.shape[1] // 2].copy()
    lesion_mask = np.zeros((9, 8), dtype=bool)
    lesion_mask[1:8, 1:7] = True
    lesion = Lesion((slice(12, 21), slice(15, 23)), lesion_mask)
    out = image.copy()
    backend.synthesize(out, lesion, (1.5, 1.5), np.random.default_rng(3))
    full = np.zeros(image.shape[1:], dtype=bool)
    full[lesion.bbox] = lesion.mask
    soft = smoothed_mask(full, backend.settings.mask_sigma_px)
    changed = (out != image)[0]
    assert not (changed & (soft == 0)).any(), "a pixel outside the smoothed mask changed"
    assert changed[full].mean() > 0.9 and (soft > 0).sum() > full.sum()
    again = image.copy()
    backend.synthesize(again, lesion, (1.5, 1.5), np.random.default_rng(3))
    assert np.array_equal(out, again)  # seeded


def test_checkpoint_checks_its_base_model(phantom_2d, base_model, generator, tmp_path):
    sd = get_backend("sd_inversion")
    moved = tmp_path / "moved"
    with pytest.raises(GeneratorCheckpointError, match="trained on the base model .*moved does not exist"):
        sd(_plan(phantom_2d, base_model=str(moved)))
    shutil.copytree(base_model, moved)
    sd(_plan(phantom_2d, base_model=str(moved)))  # a copy of the same model is fine
    config = json.loads((moved / "unet" / "config.json").read_text(encoding="utf-8"))
    config["layers_per_block"] = 2
    (moved / "unet" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(GeneratorCheckpointError, match="has other model configurations"):
        sd(_plan(phantom_2d, base_model=str(moved)))
    with pytest.raises(GeneratorCheckpointError, match="fold_3/checkpoint_final.pth does not exist.*--base-model"):
        sd(_plan(phantom_2d, fold=3))


@pytest.fixture(scope="module")
def bank(phantom_2d, generator) -> Path:
    generate_main(["-d", str(phantom_2d), "-g", "sd_inversion", "-c", "2d", "-n", str(BANK_CASES), "--size-class",
                   "small", "--sampling-steps", str(STEPS), "-device", "cpu"])
    return bank_dir(phantom_2d, "sd_inversion", "2d", shapes=SMALL)


def _small_bank(cls: type) -> type:
    """``cls`` reading the fixture's bank, made with ``--size-class small`` (its own folder)."""
    return type(f"{cls.__name__}Small", (cls,), {"synth_shapes": SMALL})


def test_bank_inserts_a_tumour_of_the_requested_class_into_one_slice(phantom_2d, bank):
    train, _, real_folder = split_cases(phantom_2d, "2d", 0)
    ids = bank_identifiers(bank, 0)
    assert len(ids) == BANK_CASES
    real, synthetic = nnUNetDatasetBlosc2(str(real_folder)), nnUNetDatasetBlosc2(str(bank))
    for identifier in ids:
        source = parse_bank_identifier(identifier)[0]
        assert source in train
        data, seg, _, props = synthetic.load_case(identifier)
        data0, seg0, _, _ = real.load_case(source)
        data, seg, data0, seg0 = (np.asarray(a) for a in (data, seg, data0, seg0))
        (lesion_info,) = props["synth"]["lesions"]
        z = props["synth"]["slice"]
        lesion = (seg[0] == TUMOUR) & (seg0[0] != TUMOUR)
        assert lesion.sum() == lesion_info["voxels"] == lesion[z].sum()
        assert lesion_info["size_class"] == "small" == size_class_of_area(int(lesion[z].sum()))
        assert caption_of_mask(lesion[z]) == caption("small")  # the prompt the slice was generated with
        changed = (data != data0)[0]
        assert not np.delete(changed, z, axis=0).any(), "only the chosen slice changes"
        soft = smoothed_mask(lesion[z], 1.5)
        assert not (changed[z] & (soft == 0)).any() and changed[z][lesion[z]].mean() > 0.9
        locations = np.asarray(props["class_locations"][TUMOUR])
        assert len(locations) and (seg[tuple(locations.T)] == TUMOUR).all()


@pytest.mark.parametrize("cls", [nnUNetTrainerSynth20SD, nnUNetTrainerSynth60SD])
def test_sd_bank_trainers_reach_their_ratio(phantom_2d, bank, monkeypatch, cls):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = _trainer(_small_bank(cls), phantom_2d)
    train_loader, val_loader = trainer.get_dataloaders()
    train, val, _ = split_cases(phantom_2d, "2d", 0)
    ids = train_loader.data_loader.indices
    assert {i for i in ids if not is_bank_identifier(i)} == set(train)
    assert sum(map(is_bank_identifier, ids)) == BANK_CASES
    p = cls.synth_probability
    keys = np.concatenate([train_loader.data_loader.get_indices() for _ in range(5000)])
    n = len(keys)
    assert abs(sum(map(is_bank_identifier, keys)) - p * n) < 4 * np.sqrt(n * p * (1 - p))
    batch = next(train_loader)  # through nnU-Net's 2d loader and transforms
    assert batch["data"].ndim == 4
    for _ in range(3):
        assert not any(map(is_bank_identifier, next(val_loader)["keys"]))


def test_sd_realfinetune_trains_on_real_cases_only_at_the_end(phantom_2d, bank, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = _trainer(_small_bank(nnUNetTrainerSynth20SDRealFinetune), phantom_2d, num_epochs=10)
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    loader = trainer.dataloader_train.data_loader
    is_bank = np.array([is_bank_identifier(i) for i in loader.indices])
    assert trainer.first_real_only_epoch() == 8
    trainer.current_epoch = 7
    trainer.on_train_epoch_start()
    assert float(np.asarray(loader.sampling_probabilities)[is_bank].sum()) == pytest.approx(0.2)
    trainer.current_epoch = 8
    trainer.on_train_epoch_start()
    assert float(np.asarray(loader.sampling_probabilities)[is_bank].sum()) == 0.0
    assert not any(is_bank_identifier(k) for _ in range(200) for k in loader.get_indices())
    assert trainer.synth_probability == 0.0


def test_bank_of_a_3d_configuration_inpaints_3d_lesions_slice_by_slice(phantom_2d, generator, monkeypatch):
    """The 2d-trained generator serves the dataset's 3d_fullres configuration: one 3D lesion per bank case,
    inpainted slice by slice, pixels changed only inside each slice's smoothed mask; the SD trainers mix it in."""
    plan_and_preprocess(phantom_2d)  # adds the 3d_fullres configuration of the same dataset
    written = generate_bank(phantom_2d, "sd_inversion", 2, configuration="3d_fullres", sampling_steps=STEPS,
                            device="cpu", progress=False)
    assert len(written) == 2
    folder = bank_dir(phantom_2d, "sd_inversion", "3d_fullres")
    _, _, real_folder = split_cases(phantom_2d, "3d_fullres", 0)
    real, synthetic = nnUNetDatasetBlosc2(str(real_folder)), nnUNetDatasetBlosc2(str(folder))
    thickness = []
    for identifier in bank_identifiers(folder, 0):
        data, seg, _, _ = synthetic.load_case(identifier)
        data0, seg0, _, _ = real.load_case(parse_bank_identifier(identifier)[0])
        data, seg, data0, seg0 = (np.asarray(a) for a in (data, seg, data0, seg0))
        lesion = (seg[0] == TUMOUR) & (seg0[0] != TUMOUR)
        slices = np.flatnonzero(lesion.any(axis=(1, 2)))
        thickness.append(len(slices))
        changed = (data != data0)[0]
        assert not np.delete(changed, slices, axis=0).any(), "a slice without lesion changed"
        for z in slices:
            assert not (changed[z] & (smoothed_mask(lesion[z], 1.5) == 0)).any(), f"slice {z}: outside the mask"
        assert changed[lesion].mean() > 0.9
    assert max(thickness) >= 2, "3D lesions span several slices"

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    base = preprocessed_dir(phantom_2d)
    plans = dict(load_json(base / "nnUNetPlans.json"), continue_training=False)
    three_d = nnUNetTrainerSynth20SD(plans, "3d_fullres", 0, load_json(base / "dataset.json"), torch.device("cpu"))
    three_d.initialize()
    train_loader, _ = three_d.get_dataloaders()
    assert sum(map(is_bank_identifier, train_loader.data_loader.indices)) == 2
    assert next(train_loader)["data"].ndim == 5


@pytest.mark.slow
def test_sd_bank_trainer_through_nnunetv2_train(phantom_2d, generator):
    # the bank of the synth plan's own shapes (no --size-class), the one nnUNetTrainerSynth20SD reads
    generate_main(["-d", str(phantom_2d), "-g", "sd_inversion", "-c", "2d", "-n", str(BANK_CASES), "--sampling-steps",
                   str(STEPS), "-device", "cpu"])
    fold = train_as_the_readme_says(phantom_2d, "2d", "nnUNetTrainerSynth20SD_Debug", **NO_FINAL_VALIDATION)
    log = training_log(fold)
    assert f"training on 4 real and {BANK_CASES} bank cases" in log and "bank cases this epoch" in log
