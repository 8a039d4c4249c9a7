"""Generator training at scale (issue 15) and the SynBT perceptual loss (issue 13): the shared mixed-precision step,
batches drawn in background processes, periodic checkpoints, DDP of the ldm generator under torchrun (gloo on CPU),
and MONAI's perceptual loss from local ResNet-50 weights in the VQ-VAE stages.

Every training here writes into a results folder of this module's own, so the folds of the other generator tests
stay as they expect them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_synth.generator_training import main as train_main
from nnunet_synth.generators import get_backend
from nnunet_synth.generators.checkpoints import iteration_checkpoint_name
from nnunet_synth.generators.ldm.stages import stage_dir
from nnunet_synth.generators.paths import generator_output_dir
from nnunet_synth.generators.training_utils import MixedPrecision, batch_loader
from nnunet_synth.planning import load_synth_plan

from .conftest import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A results folder of this module's own (nnUNet_results while its tests run)."""
    folder = tmp_path_factory.mktemp("scale_results")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_results", str(folder))
        yield folder


def test_mixed_precision_step_unscales_before_clipping_and_keeps_its_scaler():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    amp = MixedPrecision(torch.device("cpu"), True, dtype=torch.float16)  # float16 on CPU: the CUDA recipe
    assert amp.scaler.is_enabled() and amp.describe() == "mixed precision float16 (autocast + GradScaler)"
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    before = [p.detach().clone() for p in layer.parameters()]
    with amp.autocast():
        out = layer(torch.ones(8, 4))
    assert out.dtype == torch.float16
    assert amp.step((out.float() ** 2).mean() * 1e-2, optimizer, layer.parameters(), clip_norm=1e-3)
    # clipped after unscaling: the step is lr x 1e-3 (clipping the scaled gradients would leave 1e-3 / 65536)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(layer.parameters(), before)])
    assert float(moved.norm()) == pytest.approx(1e-3, rel=1e-2)
    # an overflowing step is skipped and the scale backs off
    scale = amp.scaler.get_scale()
    kept = [p.detach().clone() for p in layer.parameters()]
    assert not amp.step(layer(torch.ones(1, 4)).sum() * float("inf"), optimizer, layer.parameters(), clip_norm=1.0)
    assert all(torch.equal(p, k) for p, k in zip(layer.parameters(), kept)) and amp.scaler.get_scale() < scale
    # a checkpoint's scaler state comes back on resume
    resumed = MixedPrecision(torch.device("cpu"), True, dtype=torch.float16)
    resumed.load_state_dict(amp.state_dict())
    assert resumed.scaler.state_dict() == amp.scaler.state_dict() and amp.state_dict()["dtype"] == "float16"
    # the CPU default is bfloat16 without a scaler; disabled is float32
    assert MixedPrecision(torch.device("cpu"), True).describe() == "mixed precision bfloat16 (autocast)"
    off = MixedPrecision(torch.device("cpu"), False)
    with off.autocast():
        assert layer(torch.ones(1, 4)).dtype == torch.float32
    assert off.state_dict() == {"dtype": None, "scaler": {}}


def _draw(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return np.array([os.getpid()]), rng.normal(size=3)


def test_batches_come_from_background_processes_and_depend_on_seed_and_iteration_only():
    in_process = list(batch_loader(_draw, (7, 0), 2, 8, num_workers=0))
    workers = list(batch_loader(_draw, (7, 0), 2, 8, num_workers=2))
    assert {int(pid[0]) for pid, _ in in_process} == {os.getpid()}
    pids = {int(pid[0]) for pid, _ in workers}
    assert len(pids) == 2 and os.getpid() not in pids  # not drawn on the training thread
    # same seed: the same batches, in the same order, whatever the worker count
    assert all(np.array_equal(a, b.numpy()) for (_, a), (_, b) in zip(in_process, workers))
    # a run resumed at iteration 5 draws what the uninterrupted run drew from there
    resumed = list(batch_loader(_draw, (7, 0), 5, 8, num_workers=2))
    assert all(np.array_equal(a, b.numpy()) for (_, a), (_, b) in zip(in_process[3:], resumed))
    # another rank draws other batches
    other = list(batch_loader(_draw, (7, 1), 2, 8, num_workers=0))
    assert not any(np.array_equal(a, b) for (_, a), (_, b) in zip(in_process, other))


def test_ddpm_with_mixed_precision_loader_workers_and_periodic_checkpoints(phantom_ct, results):
    train_main(["-d", str(phantom_ct), "-g", "ddpm", "--preset", "tiny", "--iterations", "4", "-device", "cpu",
                "--amp", "-np", "1", "--save-every", "2"])
    out = generator_output_dir(phantom_ct, "ddpm", "3d_fullres", 0)
    periodic = sorted(p.name for p in out.glob("checkpoint_iter*.pth"))
    assert periodic == ["checkpoint_iter0000002.pth", "checkpoint_iter0000004.pth"]
    assert periodic[0] == iteration_checkpoint_name(2)
    log = (out / "training_log.txt").read_text(encoding="utf-8")
    assert "mixed precision bfloat16 (autocast)" in log and "1 loader worker(s)" in log
    latest = torch.load(out / "checkpoint_latest.pth", weights_only=False)
    assert latest["amp"]["dtype"] == "bfloat16" and latest["config"]["amp"] == "bfloat16"
    # a periodic checkpoint holds the weights of its iteration and loads as the generator
    state = torch.load(out / periodic[0], weights_only=False)
    assert state["iteration"] == 2 and "optimizer" not in state
    assert any(not torch.equal(v, latest["model"][k]) for k, v in state["model"].items())
    plan = load_synth_plan(phantom_ct, "3d_fullres").replace(
        backend="ddpm", backend_params={"device": "cpu", "checkpoint": str(out / periodic[0]), "sampling_steps": 2})
    assert get_backend("ddpm")(plan).checkpoint == out / periodic[0]


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory) -> Path:
    """A randomly initialised torchvision ResNet-50 saved as a state dict (as MONAI's own perceptual-loss tests)."""
    import torchvision

    path = tmp_path_factory.mktemp("perceptual") / "resnet50.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


def test_perceptual_loss_from_local_weights_enters_the_vqvae_loss(resnet50, tmp_path):
    from types import SimpleNamespace

    from nnunet_synth.generators.ldm.autoencoder_training import (
        Perceptual,
        PerceptualNetworkError,
        perceptual_for,
        reconstruction_loss,
    )
    from nnunet_synth.generators.ldm.model import build_vqvae, get_preset

    tiny = get_preset("tiny")
    assert tiny.perceptual_weight == get_preset("paper").perceptual_weight == 0.001  # the SynBT paper's weight
    off, note = perceptual_for(SimpleNamespace(perceptual_network=None), tiny, torch.device("cpu"))
    assert off is None and "--perceptual-network" in note and "never downloads" in note
    with pytest.raises(PerceptualNetworkError, match="not_a_network.pth is not a torchvision ResNet-50"):
        torch.save({"weight": torch.zeros(1)}, tmp_path / "not_a_network.pth")
        Perceptual(0.001, tmp_path / "not_a_network.pth", torch.device("cpu"))

    perceptual, note = perceptual_for(SimpleNamespace(perceptual_network=str(resnet50)), tiny, torch.device("cpu"))
    assert "perceptual loss weight 0.001" in note and "resnet50.pth" in note
    torch.manual_seed(0)
    vqvae = build_vqvae(tiny, num_channels=2)
    x = torch.randn(2, 2, *tiny.vq_patch_size)
    recon, quantization = vqvae(x)
    total, terms = reconstruction_loss(recon, x, quantization, perceptual, None, seed=3)
    assert terms["perceptual"] > 0
    without, plain = reconstruction_loss(recon, x, quantization, None, None, seed=3)
    assert "perceptual" not in plain
    assert float((total - without).detach()) == pytest.approx(terms["perceptual"], rel=1e-5)
    assert terms["total"] == pytest.approx(plain["total"] + terms["perceptual"], rel=1e-5)
    # the term is seeded (MONAI draws the 2.5D slices): the same seed gives the same value, and it has gradients
    assert reconstruction_loss(recon, x, quantization, perceptual, None, seed=3)[1]["perceptual"] == terms["perceptual"]
    vqvae.zero_grad()
    perceptual(recon, x, seed=3).backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in vqvae.decoder.parameters())


@pytest.mark.slow
def test_ldm_trains_distributed_under_torchrun(phantom_ct, results):
    """Two gloo ranks on CPU, every stage for two iterations, batches from one background process per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", nnUNet_results=str(results))
    run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "nnunet_synth.generator_training",
         "-d", str(phantom_ct), "-g", "ldm", "--preset", "tiny", "--iterations", "2", "-device", "cpu", "-f", "1",
         "-np", "1", "--save-every", "2"], env=env, timeout=600)
    out = generator_output_dir(phantom_ct, "ldm", "3d_fullres", 1)
    log = (out / "training_log.txt").read_text(encoding="utf-8")
    for stage in ("vqvae", "vqvae-volume", "diffusion"):
        state = torch.load(stage_dir(out, stage) / "checkpoint_final.pth", weights_only=False)
        assert state["iteration"] == 2 and state["config"]["world_size"] == 2
        # all_gather of every rank's parameter sums: both ranks trained, and their replicas stayed identical
        assert f"[{stage}] finished at iteration 2; best validation loss" in log
        assert f"[{stage}] started" in log and "2 process(es)" in log
    assert log.count("parameters identical on all 2 ranks") == 3
    assert (out / iteration_checkpoint_name(2)).is_file()  # the diffusion stage's periodic checkpoint
    assert json.loads((out / "training_log.json").read_text(encoding="utf-8"))["config"]["num_workers"] == 1


def test_vqvae_stage_trains_with_the_perceptual_loss_of_a_local_network(phantom_ct, results, resnet50):
    args = ["-d", str(phantom_ct), "-g", "ldm", "--preset", "tiny", "-device", "cpu", "-np", "0", "-f", "2",
            "--stage", "vqvae", "--iterations", "2"]
    train_main(args + ["--perceptual-network", str(resnet50)])
    out = generator_output_dir(phantom_ct, "ldm", "3d_fullres", 2)
    terms = json.loads((stage_dir(out, "vqvae") / "training_log.json").read_text(encoding="utf-8"))["loss_terms"]
    assert len(terms["perceptual"]) == 2 and all(v > 0 for v in terms["perceptual"])
    for total, l1, perceptual in zip(terms["total"], terms["reconstruction"], terms["perceptual"]):
        assert total > l1 + perceptual  # L1 + commitment + perceptual
    log = (out / "training_log.txt").read_text(encoding="utf-8")
    assert "perceptual loss weight 0.001 (2.5D ResNet-50 from" in log
    train_main(args + ["--iterations", "3", "--c"])  # a resumed stage without the network says it is off
    assert "perceptual loss off: it needs pretrained ResNet-50 weights" in \
        (out / "training_log.txt").read_text(encoding="utf-8")


def test_scaling_options_are_checked(phantom_ct, results, tmp_path, capsys):
    base = ["-d", str(phantom_ct), "--preset", "tiny", "-device", "cpu"]
    for extra, message in ((["-g", "ddpm", "-np", "-1"], "-np must be 0 or more"),
                           (["-g", "sd_inversion", "-c", "2d", "--save-every", "5"], "for ddpm and ldm only"),
                           (["-g", "ddpm", "--perceptual-network", "x.pth"], "for the ldm generator"),
                           (["-g", "ldm", "--perceptual-network", str(tmp_path / "missing.pth")],
                            "missing.pth: no such file")):
        with pytest.raises(SystemExit) as exit_info:
            train_main(base + extra)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
