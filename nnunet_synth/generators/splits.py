"""A fold's training and validation cases, exactly as nnU-Net's trainer splits them.

Everything that must keep a segmenter's validation cases out of its synthetic data (generator training, the
bank, template banks, quality checks, mask previews) takes the fold's cases from :func:`split_cases`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from nnunet_synth.generators.paths import DEFAULT_PLANS_IDENTIFIER


def parse_fold(fold: str) -> int | str:
    """A fold given on the command line: ``all`` or an integer."""
    return fold if fold == "all" else int(fold)


def split_cases(dataset: str | int, configuration: str, fold: int | str,
                plans_identifier: str = DEFAULT_PLANS_IDENTIFIER) -> tuple[list[str], list[str], Path]:
    """Training and validation case identifiers of ``fold``, exactly as nnU-Net's trainer splits them.

    Runs ``nnUNetTrainer.do_split`` itself (on the attributes it reads), so custom ``splits_final.json``
    files, the 5-fold default (written to ``splits_final.json`` when absent, as nnU-Net does) and the 80:20
    fallback for higher folds all behave as in training. Fold ``all`` gives every case for both.

    Args:
        dataset: dataset name or ID.
        configuration: nnU-Net configuration whose preprocessed cases are split.
        fold: fold number or ``"all"``.
        plans_identifier: nnU-Net plans identifier.

    Returns:
        (training identifiers, validation identifiers, preprocessed folder of the configuration), sorted.

    Raises:
        FileNotFoundError: when the plans or the configuration's preprocessed folder are missing.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_synth.planning import preprocessed_dir

    base = preprocessed_dir(dataset)
    plans_file = base / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} not found: run nnUNetv2_plan_and_preprocess -d {dataset} first")
    conf = PlansManager(load_json(plans_file)).get_configuration(configuration)
    folder = base / conf.data_identifier
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: run nnUNetv2_plan_and_preprocess -d {dataset} "
                                f"-c {configuration}")
    view = SimpleNamespace(dataset_class=infer_dataset_class(str(folder)), fold=fold,
                           preprocessed_dataset_folder_base=str(base), preprocessed_dataset_folder=str(folder),
                           folder_with_segs_from_previous_stage=None, print_to_log_file=lambda *a, **k: None)
    tr_keys, val_keys = nnUNetTrainer.do_split(view)
    return sorted(str(k) for k in tr_keys), sorted(str(k) for k in val_keys), folder
