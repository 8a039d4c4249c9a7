"""``nnUNetv2_synth_train_generator``: trains a learned generator backend on nnU-Net's preprocessed data.

The generator reads the preprocessed cases and plans of one configuration (so it shares the segmenter's
spacing and normalisation) and only the training cases of the segmenter's fold, taken from nnU-Net's own
``splits_final.json`` (created the way nnU-Net creates it when absent), so the segmenter's validation cases
never reach the generator. Results go to
``nnUNet_results/DatasetNNN/nnUNetSynthGenerator_<backend>__<configuration>/fold_F/``.

Backends plug in through :data:`GENERATOR_TRAINERS`: a module with ``PRESETS`` (dict of names) and
``train(job: GeneratorJob) -> Path``. Several GPUs and nodes: start the same command with ``torchrun``.
"""

from __future__ import annotations

import argparse
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from nnunet_synth.planning import preprocessed_dir

# backend name -> module implementing its training (PRESETS and train(job))
GENERATOR_TRAINERS = {"ddpm": "nnunet_synth.generators.ddpm.training",
                      "ldm": "nnunet_synth.generators.ldm.training",
                      "sd_inversion": "nnunet_synth.generators.sd_inversion.training"}
CHECKPOINT_NAMES = ("best", "final", "latest")


@dataclass
class GeneratorJob:
    """Everything a backend's training needs, resolved from the command line and nnU-Net's files.

    Attributes:
        backend: generator backend name.
        dataset_name: nnU-Net dataset name (DatasetNNN_Name).
        configuration: nnU-Net configuration whose preprocessed data and plans are used.
        plans_identifier: nnU-Net plans identifier.
        fold: the segmenter's fold whose training cases the generator may use ('all' for all cases).
        cases: identifiers of those training cases.
        preprocessed_folder: folder of the configuration's preprocessed cases.
        output_dir: where checkpoints, logs and plots go.
        preset: model preset name of the backend.
        iterations: optimiser steps in total (None: the preset's default).
        device: 'cpu' or 'cuda'.
        resume: continue from the latest checkpoint in ``output_dir``.
        seed: base random seed.
        stage: the one training stage to run, for backends trained in stages (ldm: vqvae, vqvae-volume,
            diffusion); None runs all stages in order.
        base_model: local folder of a pretrained model the backend fine-tunes (sd_inversion).
    """

    backend: str
    dataset_name: str
    configuration: str
    plans_identifier: str
    fold: int | str
    cases: list[str]
    preprocessed_folder: Path
    output_dir: Path
    preset: str
    iterations: int | None
    device: str
    resume: bool
    seed: int = 12345
    stage: str | None = None
    base_model: str | None = None


def generator_model_dir(dataset: str | int, backend: str, configuration: str) -> Path:
    """``nnUNet_results/DatasetNNN/nnUNetSynthGenerator_<backend>__<configuration>``."""
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if nnUNet_results is None:
        raise RuntimeError("nnUNet_results is not set; export it as for nnU-Net training")
    return Path(nnUNet_results) / maybe_convert_to_dataset_name(dataset) / \
        f"nnUNetSynthGenerator_{backend}__{configuration}"


def generator_output_dir(dataset: str | int, backend: str, configuration: str, fold: int | str) -> Path:
    """The training folder of one fold: ``.../nnUNetSynthGenerator_<backend>__<configuration>/fold_F``."""
    return generator_model_dir(dataset, backend, configuration) / f"fold_{fold}"


def default_checkpoint(dataset: str | int, backend: str, configuration: str, fold: int | str,
                       which: str = "best") -> Path:
    """Path of the ``best``, ``final`` or ``latest`` checkpoint of a generator training."""
    if which not in CHECKPOINT_NAMES:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_NAMES} or a path, got {which!r}")
    return generator_output_dir(dataset, backend, configuration, fold) / f"checkpoint_{which}.pth"


def train_command(dataset: str | int, backend: str, configuration: str, fold: int | str) -> str:
    """The command line that trains the generator whose checkpoint is missing (for error messages)."""
    return f"nnUNetv2_synth_train_generator -d {dataset} -g {backend} -c {configuration} -f {fold}"


def parse_fold(fold: str) -> int | str:
    return fold if fold == "all" else int(fold)


def split_cases(dataset: str | int, configuration: str, fold: int | str,
                plans_identifier: str = "nnUNetPlans") -> tuple[list[str], list[str], Path]:
    """Training and validation case identifiers of ``fold``, exactly as nnU-Net's trainer splits them.

    Runs ``nnUNetTrainer.do_split`` itself (on the attributes it reads), so custom ``splits_final.json``
    files, the 5-fold default and the 80:20 fallback for higher folds all behave as in training.

    Returns:
        (training identifiers, validation identifiers, preprocessed folder of the configuration)
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

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


def backend_training_module(backend: str):
    """The training module of a learned backend; a clear error for backends without training."""
    if backend not in GENERATOR_TRAINERS:
        raise KeyError(f"backend {backend!r} has no generator training; trainable backends: "
                       f"{', '.join(sorted(GENERATOR_TRAINERS))}")
    return importlib.import_module(GENERATOR_TRAINERS[backend])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_train_generator",
                                     description="Train a learned tumour generator on nnU-Net's preprocessed data "
                                                 "(training-fold cases only). Multi-GPU: torchrun --nproc_per_node "
                                                 "N $(which nnUNetv2_synth_train_generator) ...")
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or ID")
    parser.add_argument("-g", "--generator", required=True, choices=sorted(GENERATOR_TRAINERS), help="backend")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-f", "--fold", default="0", help="segmenter fold whose training cases are used, or 'all'")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("--preset", default=None, help="model preset (default: the backend's first, e.g. paper)")
    parser.add_argument("--iterations", type=int, default=None, help="optimiser steps in total (default: preset)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--c", dest="resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--stage", default=None, help="ldm only: vqvae, vqvae-volume or diffusion (default: all "
                        "stages in order; with --c finished stages are skipped)")
    parser.add_argument("--base-model", default=None, help="sd_inversion only: local Stable Diffusion 1.x folder "
                        "in diffusers' save_pretrained layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    args = parser.parse_args(argv)

    import torch
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    module = backend_training_module(args.generator)
    preset = args.preset or next(iter(module.PRESETS))
    if preset not in module.PRESETS:
        parser.error(f"unknown preset {preset!r} for {args.generator}; available: {', '.join(module.PRESETS)}")
    stages = getattr(module, "STAGES", ())
    if args.stage is not None and args.stage not in stages:
        parser.error(f"--stage {args.stage!r}: {args.generator} " + (f"has the stages {', '.join(stages)}" if stages
                                                                     else "trains in one stage"))
    fold = parse_fold(args.fold)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    cases, _, folder = split_cases(args.dataset, args.configuration, fold, args.plans)
    dataset_name = str(maybe_convert_to_dataset_name(args.dataset))
    output_dir = generator_output_dir(dataset_name, args.generator, args.configuration, fold)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"training the {args.generator} generator ({preset}) on {len(cases)} training cases of fold {fold} "
              f"of {dataset_name} {args.configuration}; output: {output_dir}")
    job = GeneratorJob(backend=args.generator, dataset_name=dataset_name, configuration=args.configuration,
                       plans_identifier=args.plans, fold=fold, cases=cases, preprocessed_folder=folder,
                       output_dir=output_dir, preset=preset, iterations=args.iterations, device=device,
                       resume=args.resume, seed=args.seed, stage=args.stage, base_model=args.base_model)
    try:
        module.train(job)
    except getattr(module, "USER_ERRORS", ()) as e:  # a message, not a traceback
        parser.exit(2, f"nnUNetv2_synth_train_generator: error: {e}\n")


if __name__ == "__main__":
    main()
