"""Where generator trainings, synthetic banks and template banks live, and the commands that make them.

Every name is keyed by nnU-Net's dataset, configuration and plans identifier, so the files of
``-p nnUNetResEncUNetMPlans`` never collide with those of the default plans. With the default ``nnUNetPlans``
the names carry no plans identifier (folders made before plans were keyed keep their names); with another
plans identifier ``P`` it goes before the configuration:

* bank: ``nnUNet_preprocessed/DatasetNNN/nnUNetSynthBank_<backend>_<configuration>``, or
  ``nnUNetSynthBank_<backend>_<P>_<configuration>``; a bank made with shape settings of its own
  (``--size-preset``, ``--size-class``, ``--deformation``) ends in them, e.g. ``nnUNetSynthBank_ldm_3d_fullres_tiny``
  or ``..._tiny_simplex`` (:func:`bank_suffix`);
* generator: ``nnUNet_results/DatasetNNN/nnUNetSynthGenerator_<backend>__<configuration>/fold_F``, or
  ``nnUNetSynthGenerator_<backend>__<P>__<configuration>/fold_F``;
* template bank: ``nnUNet_preprocessed/DatasetNNN/nnUNetSynthTemplates_<configuration>.npz``, or
  ``nnUNetSynthTemplates_<P>_<configuration>.npz``.

This module imports nothing of the project at module level, so every layer can use it.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_PLANS_IDENTIFIER = "nnUNetPlans"
CHECKPOINT_NAMES = ("best", "final", "latest")
DEFAULT_CHECKPOINT = "best"
DEFAULT_FOLD = 0
# the shape settings a bank can be made with beyond its synth plan's, in the order its folder name carries them
SHAPE_KEYS = ("size_preset", "size_class", "deformation")
# settings a backend always runs with: they name no bank of it (every transplant bank uses template masks)
REQUIRED_SHAPES = {"transplant": {"deformation": "template"}}


def _keyed(plans_identifier: str, configuration: str, separator: str) -> str:
    """``<configuration>`` for the default plans, else ``<plans><separator><configuration>``."""
    if plans_identifier == DEFAULT_PLANS_IDENTIFIER:
        return configuration
    return f"{plans_identifier}{separator}{configuration}"


def bank_suffix(backend: str, shapes: dict | None = None) -> str:
    """The end of a bank's folder name that carries its shape settings: ``""`` for the synth plan's own shapes,
    else ``_<size_preset>_<size_class>_<deformation>`` of those given (in that order), e.g. ``_tiny``,
    ``_simplex``, ``_tiny_simplex``.

    A setting the backend cannot do without (transplant's ``template`` masks) names nothing: every bank of that
    backend has it.

    Args:
        backend: generator backend name.
        shapes: the shape overrides of the bank (``size_preset``, ``size_class``, ``deformation``; None values are
            not set).

    Raises:
        ValueError: a key other than :data:`SHAPE_KEYS`, or a value that cannot be part of a folder name.
    """
    shapes = {k: v for k, v in (shapes or {}).items() if v is not None}
    unknown = sorted(set(shapes) - set(SHAPE_KEYS))
    if unknown:
        raise ValueError(f"bank shape settings are {', '.join(SHAPE_KEYS)}; got {', '.join(unknown)}")
    parts = []
    for key in SHAPE_KEYS:
        value = shapes.get(key)
        if value is None or REQUIRED_SHAPES.get(backend, {}).get(key) == value:
            continue
        if not str(value).replace("_", "").isalnum():
            raise ValueError(f"{key} {value!r} cannot name a bank folder (letters, digits and '_' only)")
        parts.append(str(value))
    return "".join(f"_{part}" for part in parts)


def shape_flags(shapes: dict | None) -> str:
    """The ``nnUNetv2_synth_generate`` flags of shape overrides, e.g. `` --size-class tiny --deformation simplex``."""
    shapes = shapes or {}
    return "".join(f" --{key.replace('_', '-')} {shapes[key]}" for key in SHAPE_KEYS if shapes.get(key) is not None)


def bank_dir(dataset: str | int, backend: str, configuration: str,
             plans_identifier: str = DEFAULT_PLANS_IDENTIFIER, shapes: dict | None = None) -> Path:
    """Folder of a synthetic bank:
    ``nnUNet_preprocessed/DatasetNNN/nnUNetSynthBank_<backend>_[<P>_]<configuration>[<shape suffix>]``.

    Args:
        dataset: dataset name or ID.
        backend: generator backend name.
        configuration: nnU-Net configuration of the bank's cases.
        plans_identifier: nnU-Net plans identifier.
        shapes: the bank's shape overrides (``--size-preset``, ``--size-class``, ``--deformation``); None or empty:
            the bank of the synth plan's shapes, whose name has no suffix (:func:`bank_suffix`).

    Returns:
        The folder (not created).
    """
    from nnunet_synth.planning import preprocessed_dir

    # the shapes go last: a Tiny LDM bank must not share the folder (and the fold manifests) of the plan's LDM bank
    name = f"nnUNetSynthBank_{backend}_{_keyed(plans_identifier, configuration, '_')}{bank_suffix(backend, shapes)}"
    return preprocessed_dir(dataset) / name


def generator_model_dir(dataset: str | int, backend: str, configuration: str,
                        plans_identifier: str = DEFAULT_PLANS_IDENTIFIER) -> Path:
    """Folder of a generator's trainings (one ``fold_F`` each):
    ``nnUNet_results/DatasetNNN/nnUNetSynthGenerator_<backend>__[<P>__]<configuration>``.

    Raises:
        RuntimeError: when ``nnUNet_results`` is not set.
    """
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_results:
        raise RuntimeError("nnUNet_results is not set; export it as for nnU-Net training")
    name = f"nnUNetSynthGenerator_{backend}__{_keyed(plans_identifier, configuration, '__')}"
    return Path(os.fspath(nnUNet_results)) / maybe_convert_to_dataset_name(dataset) / name


def generator_output_dir(dataset: str | int, backend: str, configuration: str, fold: int | str,
                         plans_identifier: str = DEFAULT_PLANS_IDENTIFIER) -> Path:
    """The training folder of one fold: ``<generator_model_dir>/fold_F``."""
    return generator_model_dir(dataset, backend, configuration, plans_identifier) / f"fold_{fold}"


def default_checkpoint(dataset: str | int, backend: str, configuration: str, fold: int | str,
                       which: str = DEFAULT_CHECKPOINT, plans_identifier: str = DEFAULT_PLANS_IDENTIFIER) -> Path:
    """Path of the ``best``, ``final`` or ``latest`` checkpoint of a generator training.

    Raises:
        ValueError: for ``which`` not in :data:`CHECKPOINT_NAMES`.
    """
    if which not in CHECKPOINT_NAMES:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_NAMES} or a path, got {which!r}")
    return generator_output_dir(dataset, backend, configuration, fold, plans_identifier) / f"checkpoint_{which}.pth"


def resolve_checkpoint(dataset: str | int, backend: str, configuration: str, backend_params: dict,
                       plans_identifier: str = DEFAULT_PLANS_IDENTIFIER, default: str = DEFAULT_CHECKPOINT
                       ) -> tuple[Path, int | str]:
    """The checkpoint a backend loads, named by the synth plan's ``backend_params``.

    ``backend_params["checkpoint"]`` is a path or one of :data:`CHECKPOINT_NAMES` (absent: ``default``) of the
    training folder of ``backend_params["fold"]`` (absent: 0) for this dataset, configuration and plans.

    Args:
        dataset: dataset name or ID.
        backend: backend whose training folder holds the named checkpoints.
        configuration: nnU-Net configuration the generator was trained on.
        backend_params: the synth plan's ``backend_params``.
        plans_identifier: nnU-Net plans identifier.
        default: checkpoint name used when the parameters name none.

    Returns:
        (checkpoint path, fold of the training folder).
    """
    fold = backend_params.get("fold", DEFAULT_FOLD)
    which = str(backend_params.get("checkpoint") or default)
    if which in CHECKPOINT_NAMES:
        return default_checkpoint(dataset, backend, configuration, fold, which, plans_identifier), fold
    return Path(which).expanduser(), fold


def _plans_flag(plans_identifier: str) -> str:
    return "" if plans_identifier == DEFAULT_PLANS_IDENTIFIER else f" -p {plans_identifier}"


def train_command(dataset: str | int, backend: str, configuration: str, fold: int | str,
                  plans_identifier: str = DEFAULT_PLANS_IDENTIFIER) -> str:
    """The command line that trains a missing generator (for error messages)."""
    return (f"nnUNetv2_synth_train_generator -d {dataset} -g {backend} -c {configuration} -f {fold}"
            f"{_plans_flag(plans_identifier)}")


def generate_command(dataset: str | int, backend: str, configuration: str, fold: int | str,
                     plans_identifier: str = DEFAULT_PLANS_IDENTIFIER, shapes: dict | None = None) -> str:
    """The command line that makes a missing bank (for error messages), with the bank's shape flags after
    ``-n N``, e.g. ``nnUNetv2_synth_generate -d D -g ldm -c 3d_fullres -f 0 -n N --size-class tiny``."""
    return (f"nnUNetv2_synth_generate -d {dataset} -g {backend} -c {configuration} -f {fold}"
            f"{_plans_flag(plans_identifier)} -n N{shape_flags(shapes)}")


def template_file(preprocessed: Path, configuration: str, plans_identifier: str = DEFAULT_PLANS_IDENTIFIER) -> Path:
    """The template bank of real tumour masks: ``<preprocessed>/nnUNetSynthTemplates_[<P>_]<configuration>.npz``.

    Args:
        preprocessed: the dataset's folder in ``nnUNet_preprocessed``.
        configuration: nnU-Net configuration whose preprocessed cases the masks come from.
        plans_identifier: nnU-Net plans identifier.
    """
    return Path(preprocessed) / f"nnUNetSynthTemplates_{_keyed(plans_identifier, configuration, '_')}.npz"
