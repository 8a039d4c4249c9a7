"""Console entry points (``nnUNetv2_synth_*``)."""

from __future__ import annotations

import argparse


def plan_entry() -> None:
    """nnUNetv2_synth_plan -d DATASET [-c CONFIG] [--organ-label N] [--tumour-label N]"""
    from nnunet_synth.planning import main

    main()


def demo_entry() -> None:
    """nnUNetv2_synth_demo [-o DIR]"""
    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_demo", description="Phantom -> nnU-Net planning -> "
                                     "synth plan -> Synth training -> prediction -> Dice -> preview PNGs (CPU).")
    parser.add_argument("-o", "--output", default="nnunet_synth_demo", help="demo folder (default: %(default)s)")
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainerSynth20_Demo", help="trainer (default: %(default)s)")
    parser.add_argument("--modality", choices=["CT", "MRI"], default="CT")
    parser.add_argument("--num-train", type=int, default=10)
    parser.add_argument("--num-test", type=int, default=3)
    args = parser.parse_args()
    from nnunet_synth.demo import run_demo

    run_demo(args.output, args.trainer, args.num_train, args.num_test, args.modality)


def preview_entry() -> None:
    """nnUNetv2_synth_preview -d DATASET [-c CONFIG] -n 8 -o DIR"""
    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_preview", description="PNGs of real preprocessed "
                                     "patches before/after synthesis, the synthetic tumour outlined.")
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-n", "--num", type=int, default=8)
    parser.add_argument("-o", "--output", default="synth_preview")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from nnunet_synth.preview import write_previews

    paths = write_previews(args.dataset, args.configuration, args.num, args.output, args.plans, args.seed)
    print(f"wrote {len(paths)} previews to {args.output}")


def export_entry() -> None:
    """nnUNetv2_synth_export -d DATASET -c CONFIG -tr TRAINER -o OUT[.zip] [-f FOLDS ...]"""
    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_export", description="Rewrite a Synth training's "
                                     "checkpoints so that plain nnU-Net (no nnUNet_extTrainer) predicts with them.")
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-tr", "--trainer", required=True)
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-f", "--folds", nargs="+", help="folds to export (default: all finished ones)")
    parser.add_argument("-o", "--output", required=True,
                        help="folder (an nnUNet_results tree) or .zip (for nnUNetv2_install_pretrained_model_from_zip)")
    args = parser.parse_args()
    from nnunet_synth.export import export_model

    out = export_model(args.dataset, args.trainer, args.configuration, args.output, args.folds, args.plans)
    print(f"exported to {out}")


def phantom_entry() -> None:
    """nnUNetv2_synth_phantom -d ID [--modality CT|MRI] [--healthy] [--num-train N] [--num-test N]"""
    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_phantom",
                                     description="Write a procedural phantom dataset into nnUNet_raw.")
    parser.add_argument("-d", "--dataset-id", type=int, required=True)
    parser.add_argument("--modality", choices=["CT", "MRI"], default="CT")
    parser.add_argument("--healthy", action="store_true", help="training cases without tumours (label-free)")
    parser.add_argument("--num-train", type=int, default=10)
    parser.add_argument("--num-test", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    from nnunet_synth.phantom import write_phantom_dataset

    path = write_phantom_dataset(args.dataset_id, args.num_train, args.num_test, args.modality, args.healthy,
                                 args.seed, overwrite=args.overwrite)
    print(f"wrote {path}")
