"""``nnUNetv2_synth_train_generator``: trains a learned generator backend on nnU-Net's preprocessed data.

The generator reads the preprocessed cases and plans of one configuration (so it shares the segmenter's
spacing and normalisation) and only the training cases of the segmenter's fold, split by nnU-Net's own
``do_split`` (:func:`nnunet_synth.generators.splits.split_cases`), so the segmenter's validation cases never
reach the generator. Results go to the folder of :func:`nnunet_synth.generators.paths.generator_output_dir`
(``nnUNet_results/DatasetNNN/nnUNetSynthGenerator_<backend>__<configuration>/fold_F/`` for the default plans).

The trainable backends are those of the registry whose class names a ``training_module``
(:func:`nnunet_synth.generators.trainable_backends`); that module's contract is
:class:`nnunet_synth.generators.training_utils.BackendTraining`. Several GPUs and nodes: start the same command
with ``torchrun`` (every backend). Mixed precision (``--amp``, on by default on CUDA), background patch loading
(``-np``) and periodic checkpoints (``--save-every``) are shared by the backends through
:mod:`nnunet_synth.generators.training_utils`.
"""

from __future__ import annotations

import argparse
import os

from nnunet_synth.cli import HelpFormatter, add_deprecated_alias, add_num_processes_argument, exit_on_user_error
from nnunet_synth.generators import trainable_backends
from nnunet_synth.generators.paths import DEFAULT_PLANS_IDENTIFIER, generator_output_dir
from nnunet_synth.generators.splits import parse_fold, split_cases
from nnunet_synth.generators.training_utils import GeneratorJob, load_training


@exit_on_user_error("nnUNetv2_synth_train_generator")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_train_generator", formatter_class=HelpFormatter,
                                     description="Train a learned tumour generator on nnU-Net's preprocessed data "
                                                 "(training-fold cases only). Multi-GPU: torchrun --nproc_per_node "
                                                 "N $(which nnUNetv2_synth_train_generator) ...")
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or ID")
    parser.add_argument("-g", "--generator", required=True, choices=trainable_backends(), help="backend")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration")
    parser.add_argument("-f", "--fold", default="0", help="segmenter fold whose training cases are used, or 'all'")
    parser.add_argument("-p", "--plans", default=DEFAULT_PLANS_IDENTIFIER, help="plans identifier")
    parser.add_argument("--preset", default=None, help="model preset (default: the backend's first, e.g. paper)")
    parser.add_argument("--iterations", type=int, default=None, help="optimiser steps in total (default: preset)")
    add_deprecated_alias(parser, parser.add_argument("-device", choices=["cpu", "cuda"], default=None,
                                                     help="training device (default: cuda if available)"),
                         "--device")
    parser.add_argument("--seed", type=int, default=12345, help="seed of initialisation and sampling")
    parser.add_argument("--c", dest="resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--stage", default=None, help="ldm only: vqvae, vqvae-volume or diffusion (default: all "
                        "stages in order; with --c finished stages are skipped)")
    parser.add_argument("--base-model", default=None, help="sd_inversion only: local Stable Diffusion 1.x folder "
                        "in diffusers' save_pretrained layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision: float16 autocast + GradScaler on CUDA, bfloat16 autocast on CPU "
                             "(default: on with CUDA, off on CPU)")
    add_num_processes_argument(parser, "background processes per training process that draw the training patches "
                                       "(0: the training process draws them itself)")
    parser.add_argument("--save-every", type=int, default=None, metavar="K",
                        help="ddpm and the ldm diffusion stage: also keep checkpoint_iterNNNNNNN.pth every K "
                             "iterations (weights only, for nnUNetv2_synth_quality --select-checkpoint)")
    parser.add_argument("--perceptual-network", default=None, metavar="PATH",
                        help="ldm only: local torchvision ResNet-50 state dict (torch.save of its state_dict) for "
                             "the VQ-VAE's perceptual loss (weight 0.001 in the paper preset); nothing is downloaded, "
                             "without it the loss is off")
    args = parser.parse_args(argv)

    import torch
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    training = load_training(args.generator)
    preset = args.preset or next(iter(training.presets))
    if preset not in training.presets:
        parser.error(f"unknown preset {preset!r} for {args.generator}; available: {', '.join(training.presets)}")
    if args.stage is not None and args.stage not in training.stages:
        parser.error(f"--stage {args.stage!r}: {args.generator} " + (
            f"has the stages {', '.join(training.stages)}" if training.stages else "trains in one stage"))
    if args.num_processes < 0:
        parser.error(f"-np must be 0 or more, got {args.num_processes}")
    if args.save_every is not None and (args.save_every < 1 or args.generator not in ("ddpm", "ldm")):
        parser.error(f"--save-every {args.save_every}: a positive iteration count, for ddpm and ldm only")
    if args.perceptual_network is not None:
        if args.generator != "ldm":
            parser.error("--perceptual-network is for the ldm generator (its VQ-VAE) only")
        if not os.path.isfile(args.perceptual_network):
            parser.error(f"--perceptual-network {args.perceptual_network}: no such file")
    fold = parse_fold(args.fold)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("-device cuda but no CUDA device is available")
    amp = device == "cuda" if args.amp is None else args.amp
    cases, _, folder = split_cases(args.dataset, args.configuration, fold, args.plans)
    dataset_name = str(maybe_convert_to_dataset_name(args.dataset))
    output_dir = generator_output_dir(dataset_name, args.generator, args.configuration, fold, args.plans)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"training the {args.generator} generator ({preset}) on {len(cases)} training cases of fold {fold} "
              f"of {dataset_name} {args.configuration} ({args.plans}) on {device}, mixed precision "
              f"{'on' if amp else 'off'}, {args.num_processes} loader worker(s); output: {output_dir}")
    job = GeneratorJob(backend=args.generator, dataset_name=dataset_name, configuration=args.configuration,
                       plans_identifier=args.plans, fold=fold, cases=cases, preprocessed_folder=folder,
                       output_dir=output_dir, preset=preset, iterations=args.iterations, device=device,
                       resume=args.resume, seed=args.seed, stage=args.stage, base_model=args.base_model, amp=amp,
                       num_workers=args.num_processes, save_every=args.save_every,
                       perceptual_network=args.perceptual_network)
    with exit_on_user_error(parser.prog, also=training.user_errors):  # the backend's own user errors too
        training.train(job)


if __name__ == "__main__":
    main()
