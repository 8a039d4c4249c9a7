"""Checkpoints of learned generators: saved atomically, checked on load against what the caller expects.

A checkpoint is a dict with ``format``, ``backend``, ``config`` (everything needed to rebuild the model and
to check that it fits a dataset: dataset, configuration, channel count, spacing, patch size, normalisation)
and the model/optimiser state. Loading names the file and the mismatch instead of failing deep in PyTorch.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "nnunet_synth_generator"
CHECKPOINT_VERSION = 1


class GeneratorCheckpointError(RuntimeError):
    """A generator checkpoint that is missing, unreadable or made for other data."""


def save_checkpoint(state: dict, path: Path) -> None:
    """Writes ``state`` to a temporary file and renames it, so a crash never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, backend: str, expected: dict | None = None, hint: str = "",
                    map_location: str | torch.device = "cpu") -> dict:
    """Loads a generator checkpoint and checks it.

    Args:
        path: checkpoint file.
        backend: backend name the checkpoint must be for.
        expected: entries of the checkpoint's ``config`` that must match (e.g. dataset_name, configuration,
            num_channels); ``None`` values are not checked.
        hint: appended to the missing-file error (the command that makes the file).
        map_location: where tensors are loaded.

    Raises:
        GeneratorCheckpointError: the file is missing, truncated/corrupt, not a generator checkpoint, for
            another backend, or its config differs from ``expected``; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise GeneratorCheckpointError(f"generator checkpoint {path} does not exist" + (f"; {hint}" if hint else ""))
    try:
        # weights_only=False: the checkpoint holds numpy RNG state and plain config dicts we wrote ourselves
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise GeneratorCheckpointError(f"generator checkpoint {path} cannot be read (truncated or corrupt "
                                       f"file, {type(e).__name__}: {e}); copy it again or re-train") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise GeneratorCheckpointError(f"{path} is not an nnunet_synth generator checkpoint")
    if state.get("backend") != backend:
        raise GeneratorCheckpointError(f"generator checkpoint {path} is for backend {state.get('backend')!r}, "
                                       f"not {backend!r}")
    config = state.get("config", {})
    for key, want in (expected or {}).items():
        if want is None:
            continue
        have = config.get(key)
        if _normalise(have) != _normalise(want):
            raise GeneratorCheckpointError(f"generator checkpoint {path} does not fit: it was trained with "
                                           f"{key} = {have!r}, but this run has {key} = {want!r}")
    return state


def _normalise(value):
    """Tuples and lists compare equal; floats to 1e-6 relative (spacings read back from JSON)."""
    if isinstance(value, (list, tuple)):
        return tuple(_normalise(v) for v in value)
    if isinstance(value, float):
        return round(value, 6)
    return value


# --- checkpoint selection (the liver-MRI paper's model selection, ``nnUNetv2_synth_quality --select-checkpoint``)

# beside a generator's checkpoints: the one chosen by the one-class SVM score, with every checkpoint's score
SELECTION_FILE = "selected_checkpoint.json"
# periodic checkpoints of a training: checkpoint_iter{N:07d}.pth, N the iteration
PERIODIC_CHECKPOINT = re.compile(r"^checkpoint_iter(?P<iteration>\d+)\.pth$")


def iteration_checkpoint_name(iteration: int) -> str:
    """``checkpoint_iter{N:07d}.pth``: the periodic checkpoints ``--save-every`` keeps (matched by
    :data:`PERIODIC_CHECKPOINT`, scored by ``nnUNetv2_synth_quality --select-checkpoint``)."""
    return f"checkpoint_iter{int(iteration):07d}.pth"

# the named checkpoints scored besides the periodic ones (latest is a copy of the newest state, not a candidate)
SELECTABLE_NAMES = ("checkpoint_best.pth", "checkpoint_final.pth")


def selectable_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints of a generator training that checkpoint selection scores: every ``checkpoint_iter*.pth``
    by iteration, then ``checkpoint_best.pth`` and ``checkpoint_final.pth`` where present."""
    folder = Path(folder)
    periodic = [p for p in folder.glob("checkpoint_iter*.pth") if PERIODIC_CHECKPOINT.match(p.name)]
    periodic.sort(key=lambda p: int(PERIODIC_CHECKPOINT.match(p.name)["iteration"]))
    return periodic + [folder / name for name in SELECTABLE_NAMES if (folder / name).is_file()]


def record_selection(folder: Path, selection: dict) -> Path:
    """Writes ``selection`` (its ``checkpoint``: the chosen file's name in ``folder``) atomically to
    ``folder/selected_checkpoint.json``.

    Returns:
        The written file.
    """
    folder = Path(folder)
    if not (folder / selection["checkpoint"]).is_file():
        raise GeneratorCheckpointError(f"the selected checkpoint {folder / selection['checkpoint']} does not exist")
    path = folder / SELECTION_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(selection, indent=2, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def selected_checkpoint(folder: Path) -> Path | None:
    """The checkpoint recorded in ``folder/selected_checkpoint.json``; None where no selection was recorded.

    Raises:
        GeneratorCheckpointError: the file is not a selection record, or the checkpoint it names no longer exists
            (the message names both and how to choose again).
    """
    path = Path(folder) / SELECTION_FILE
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text(encoding="utf-8"))["checkpoint"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise GeneratorCheckpointError(f"{path} is not a checkpoint selection record ({type(e).__name__}: {e}); "
                                       f"delete it or run nnUNetv2_synth_quality --select-checkpoint again") from e
    chosen = Path(folder) / str(name)
    if not chosen.is_file():
        raise GeneratorCheckpointError(f"{path} selects {chosen}, which no longer exists; run "
                                       f"nnUNetv2_synth_quality --select-checkpoint again, or delete {path.name} to "
                                       f"use the default checkpoint")
    return chosen
