"""Export a Synth training so that a plain nnU-Net install (no nnUNet_extTrainer) predicts with it.

Synth trainers never change the network, so rewriting ``trainer_name`` in the checkpoints to
``nnUNetTrainer`` is all nnU-Net's predictor needs (it rebuilds the network through that class). The
results-folder layout and name stay as they are, so nnU-Net's ``-tr`` still finds the folder and the name
still records how the model was trained.
"""

from __future__ import annotations

import os
import pickletools
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from tqdm import tqdm

PLAIN_TRAINER = "nnUNetTrainer"
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
# files of a results folder that inference needs or that document the model (as nnU-Net's export keeps)
KEEP = ("plans.json", "dataset.json", "dataset_fingerprint.json", "nnUNetSynthPlans.json", "debug.json",
        "progress.png", "summary.json", "synth_stats.json")


def model_folder(dataset: str | int, trainer: str, configuration: str, plans_identifier: str = "nnUNetPlans"
                 ) -> Path:
    """``nnUNet_results/DatasetNNN/TRAINER__PLANS__CONFIGURATION``."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return Path(get_output_folder(dataset, trainer, plans_identifier, configuration))


def rewrite_checkpoint(src: Path, dst: Path) -> None:
    """Copies a checkpoint with ``trainer_name`` set to plain nnU-Net's trainer."""
    checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    if "trainer_name" not in checkpoint or "network_weights" not in checkpoint:
        raise ValueError(f"{src} is not an nnU-Net checkpoint (no trainer_name/network_weights)")
    checkpoint["trainer_name"] = PLAIN_TRAINER
    torch.save(checkpoint, dst)
    if "nnunet_synth" in _pickled_globals(dst):
        raise RuntimeError(f"{dst} still references nnunet_synth objects; a plain nnU-Net could not load it")


def _pickled_globals(path: Path) -> str:
    """Module names the checkpoint's pickle refers to (torch.save writes a zip holding data.pkl)."""
    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        ops = pickletools.genops(z.read(pkl))
        return " ".join(str(arg) for op, arg, _ in ops if op.name in ("GLOBAL", "SHORT_BINUNICODE", "BINUNICODE")
                        and isinstance(arg, str) and "." in arg)


def export_model(dataset: str | int, trainer: str, configuration: str, output: str | os.PathLike,
                 folds: tuple[str, ...] | None = None, plans_identifier: str = "nnUNetPlans") -> Path:
    """Exports a trained Synth model for plain nnU-Net.

    Args:
        dataset: dataset name or ID.
        trainer: the Synth trainer the model was trained with.
        configuration: nnU-Net configuration.
        output: a folder (becomes an ``nnUNet_results``-style tree: set ``nnUNet_results`` to it and use
            ``nnUNetv2_predict``) or a ``.zip`` file (install with ``nnUNetv2_install_pretrained_model_from_zip``).
        folds: folds to export (default: every fold folder with a final checkpoint).
        plans_identifier: plans identifier.

    Returns:
        The output path.
    """
    src = model_folder(dataset, trainer, configuration, plans_identifier)
    if not src.is_dir():
        raise FileNotFoundError(f"no trained model in {src}")
    fold_dirs = sorted(p for p in src.glob("fold_*") if (p / "checkpoint_final.pth").is_file())
    if folds is not None:
        wanted = {f"fold_{f}" for f in folds}
        missing = wanted - {p.name for p in fold_dirs}
        if missing:
            raise FileNotFoundError(f"{src} has no checkpoint_final.pth for {sorted(missing)}")
        fold_dirs = [p for p in fold_dirs if p.name in wanted]
    if not fold_dirs:
        raise FileNotFoundError(f"{src} has no fold with checkpoint_final.pth: finish the training first")
    output = Path(output)
    rel = Path(src.parent.name) / src.name
    output.parent.mkdir(parents=True, exist_ok=True)
    # assemble beside the output and move into place when complete, so a failed export leaves nothing behind
    with tempfile.TemporaryDirectory(prefix=".nnunet_synth_export.", dir=output.parent) as tmp:
        tree = Path(tmp) / "tree"
        dst = tree / rel
        dst.mkdir(parents=True)
        for name in KEEP:
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)
        for fold in tqdm(fold_dirs, desc="export folds", unit="fold"):
            (dst / fold.name).mkdir()
            for name in KEEP:
                if (fold / name).is_file():
                    shutil.copy2(fold / name, dst / fold.name / name)
            if (fold / "validation" / "summary.json").is_file():
                (dst / fold.name / "validation").mkdir()
                shutil.copy2(fold / "validation" / "summary.json", dst / fold.name / "validation" / "summary.json")
            for name in CHECKPOINTS:
                if (fold / name).is_file():
                    rewrite_checkpoint(fold / name, dst / fold.name / name)
        if output.suffix == ".zip":
            part = Path(tmp) / output.name
            with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as z:
                for f in sorted(tree.rglob("*")):
                    if f.is_file():
                        z.write(f, f.relative_to(tree))
            os.replace(part, output)
        else:
            target = output / rel
            if target.exists():
                raise FileExistsError(f"{target} exists; remove it or export elsewhere")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(dst), str(target))
    return output
