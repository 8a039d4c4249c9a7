"""Export a Synth training so that a plain nnU-Net install (no nnUNet_extTrainer) predicts with it.

Synth trainers never change the network, so rewriting ``trainer_name`` in the checkpoints to
``nnUNetTrainer`` is all nnU-Net's predictor needs (it rebuilds the network through that class). The
results-folder layout and name stay as they are, so nnU-Net's ``-tr`` still finds the folder and the name
still records how the model was trained.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import types
import zipfile
from pathlib import Path

import torch
from tqdm import tqdm

PLAIN_TRAINER = "nnUNetTrainer"
PLUGIN = "nnunet_synth"
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
    """Copies a checkpoint with ``trainer_name`` set to plain nnU-Net's trainer.

    Raises:
        ValueError: ``src`` is unreadable or no nnU-Net checkpoint, or the copy still needs this plugin to load
            or to build its network (see :func:`plugin_references`).
    """
    checkpoint, _ = _load_recording_imports(src)
    if not isinstance(checkpoint, dict) or "trainer_name" not in checkpoint or "network_weights" not in checkpoint:
        raise ValueError(f"{src} is not an nnU-Net checkpoint (no trainer_name/network_weights)")
    checkpoint["trainer_name"] = PLAIN_TRAINER
    torch.save(checkpoint, dst)
    references = plugin_references(dst)
    if references:
        raise ValueError(f"{src} references {', '.join(references)}: a plain nnU-Net install could not load the "
                         f"exported model")


def plugin_references(path: Path) -> list[str]:
    """What a plain nnU-Net install (without this plugin) would fail to import when it loads a checkpoint: the
    ``nnunet_synth`` classes and functions its pickle imports, and class names in its plans (nnU-Net imports the
    network class by name). Strings that merely mention the plugin (``converted_by`` in dataset.json) are data
    and import nothing.

    Raises:
        ValueError: the file is not a readable torch checkpoint.
    """
    checkpoint, imported = _load_recording_imports(path)
    references = [name for name in imported if name.split(".")[0] == PLUGIN]
    plans = checkpoint.get("init_args", {}).get("plans", {}) if isinstance(checkpoint, dict) else {}
    for configuration, settings in (plans.get("configurations") or {}).items():
        architecture = settings.get("architecture", {}) if isinstance(settings, dict) else {}
        name = architecture.get("network_class_name", "") if isinstance(architecture, dict) else ""
        if isinstance(name, str) and name.split(".")[0] == PLUGIN:
            references.append(f"{name} (network class of configuration {configuration})")
    return sorted(set(references))


def _load_recording_imports(path: Path) -> tuple[object, list[str]]:
    """The checkpoint and every ``module.name`` its pickle imports, in order."""
    imported: list[str] = []

    class RecordingUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            imported.append(f"{module}.{name}")
            return super().find_class(module, name)

    # torch.load subclasses pickle_module.Unpickler for its own lookups, so every import passes find_class above
    recording = types.SimpleNamespace(__name__="pickle", Unpickler=RecordingUnpickler, load=pickle.load)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=recording)
    except Exception as err:  # whatever torch.load meets in a damaged file (zip, pickle, legacy format errors)
        raise ValueError(f"cannot read checkpoint {path}: {' '.join(str(err).split())}") from err
    return checkpoint, imported


def export_model(dataset: str | int, trainer: str, configuration: str, output: str | os.PathLike,
                 folds: tuple[str, ...] | None = None, plans_identifier: str = "nnUNetPlans",
                 overwrite: bool = False) -> Path:
    """Exports a trained Synth model for plain nnU-Net.

    Args:
        dataset: dataset name or ID.
        trainer: the Synth trainer the model was trained with.
        configuration: nnU-Net configuration.
        output: a folder (becomes an ``nnUNet_results``-style tree: set ``nnUNet_results`` to it and use
            ``nnUNetv2_predict``) or a ``.zip`` file (install with ``nnUNetv2_install_pretrained_model_from_zip``).
        folds: folds to export (default: every fold folder with a final checkpoint).
        plans_identifier: plans identifier.
        overwrite: replace an existing zip file, or this model's folder in an existing output tree.

    Returns:
        The output path.

    Raises:
        FileExistsError: the zip file, or this model in the output tree, exists and ``overwrite`` is not set.
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
    existing = output if output.suffix == ".zip" else output / rel
    if output.suffix == ".zip" and output.is_dir():
        raise IsADirectoryError(f"{output} is a folder; name a .zip file or a folder without the .zip suffix")
    if existing.exists() and not overwrite:
        raise FileExistsError(f"{existing} exists; pass --overwrite to replace it, or export elsewhere")
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
            existing.parent.mkdir(parents=True, exist_ok=True)
            if existing.exists():  # overwrite: the old model goes into the temporary folder, removed with it
                shutil.move(str(existing), str(Path(tmp) / "replaced"))
            shutil.move(str(dst), str(existing))
    return output
