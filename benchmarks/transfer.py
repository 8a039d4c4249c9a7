"""Transfer benchmark: networks trained with synthetic tumours only, scored on the real tumours of held-out cases.

The source dataset's real tumours are hidden behind nnU-Net's ignore label in a copy; one model per synthetic
backend trains on the copy, the real-label model (upper bound) on the source, all through ``nnUNetv2_train`` on one
fold; ``nnUNetv2_predict`` and ``nnUNetv2_synth_evaluate`` score the fold's validation cases against their real
tumours (see nnunet_synth.evaluation.transfer_benchmark and docs/evaluation.md).

    # the IBSI sarcoma CT cohort on 2 CPU cores (about an hour): CPU plans (2 mm in-plane, half the features,
    # 32 x 64 x 64 patches), 10 x 50 iterations per model
    python benchmarks/transfer.py -d 950 -o transfer_sts --target-spacing 3.27 1.95 1.95 --gpu-memory-target 1 \\
        --features-scale 0.5 --patch-size 32 64 64 -p nnUNetPlans_TransferCPU
    # on a GPU: nnU-Net's own plans, a longer schedule
    python benchmarks/transfer.py -d 950 -o transfer_sts_gpu -device cuda --epochs 50 --iterations 250 \\
        --contenders analytic analytic-paper transplant --floor
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnunet_synth.evaluation.transfer_benchmark import (
    CONTENDERS,
    TransferError,
    TransferSettings,
    format_table,
    run_transfer,
)
from nnunet_synth.trainers.transfer import TRANSFER_SCHEDULE


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True, help="existing raw dataset with real tumour labels (ID/name)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder (predictions, report, table)")
    parser.add_argument("--hidden-id", type=int, default=None,
                        help="ID of the hidden-tumour copy this command creates (default: reuse the copy of this "
                             "source, or the first free ID above the source's)")
    parser.add_argument("--contenders", nargs="+", default=["analytic", "transplant"], choices=list(CONTENDERS),
                        help="synthetic backends, one model each")
    parser.add_argument("--floor", action="store_true", help="also train vanilla nnU-Net on the hidden copy")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration")
    parser.add_argument("-f", "--fold", type=int, default=0, help="fold trained and scored")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier shared by both datasets")
    parser.add_argument("--margin-mm", type=float, default=5.0, help="dilation of the hidden region around tumours")
    parser.add_argument("--epochs", type=int, default=TRANSFER_SCHEDULE[0], help="epochs per model")
    parser.add_argument("--iterations", type=int, default=TRANSFER_SCHEDULE[1], help="training iterations per epoch")
    parser.add_argument("--val-iterations", type=int, default=TRANSFER_SCHEDULE[2],
                        help="validation iterations per epoch (nnU-Net's pseudo Dice)")
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda"], help="device of training and prediction")
    parser.add_argument("-np", type=int, default=2, help="processes of planning and preprocessing")
    parser.add_argument("--tta", action="store_true", help="test-time mirroring in prediction (slow on a CPU)")
    parser.add_argument("--gpu-memory-target", type=float, default=None,
                        help="make the plans with nnUNetv2_plan_experiment -gpu_memory_target (GB)")
    parser.add_argument("--target-spacing", type=float, nargs="+", default=None,
                        help="make the plans with nnUNetv2_plan_experiment -overwrite_target_spacing")
    parser.add_argument("--features-scale", type=float, default=1.0,
                        help="scale the planned features per stage (plans made by this command only)")
    parser.add_argument("--patch-size", type=int, nargs="+", default=None,
                        help="replace the planned patch size (plans made by this command only)")
    parser.add_argument("--retrain", action="store_true", help="train again where a final checkpoint exists")
    args = parser.parse_args()
    settings = TransferSettings(
        dataset=args.dataset, output=args.output, hidden_id=args.hidden_id, contenders=args.contenders,
        floor=args.floor, configuration=args.configuration, fold=args.fold, plans=args.plans,
        margin_mm=args.margin_mm, schedule=(args.epochs, args.iterations, args.val_iterations), device=args.device,
        num_processes=args.np, tta=args.tta, gpu_memory_target=args.gpu_memory_target,
        target_spacing=args.target_spacing, features_scale=args.features_scale, patch_size=args.patch_size,
        retrain=args.retrain)
    try:
        results = run_transfer(settings)
    except TransferError as e:
        print(f"benchmarks/transfer.py: error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
