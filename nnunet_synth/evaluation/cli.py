"""Console entry point ``nnUNetv2_synth_evaluate``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nnunet_synth.cli import HelpFormatter, add_num_processes_argument, exit_on_user_error

from .cases import guess_tumour_label


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``nnUNetv2_synth_evaluate``."""
    p = argparse.ArgumentParser(
        prog="nnUNetv2_synth_evaluate", formatter_class=HelpFormatter,
        description=(
            "Evaluates tumour segmentations against a reference folder: Dice, HD95, HD, ASSD, surface "
            "Dice, precision, recall and lesion detection per case; means with bootstrap 95% CIs per "
            "tumour-size group; paired tests of every run against the first. Writes summary.json, "
            "report.md and PNG plots. Files are matched by name and read with nnU-Net's readers "
            "(any format nnU-Net reads); spacing comes from the files."
        ),
    )
    p.add_argument("-ref", required=True, metavar="GT_FOLDER", help="folder of reference segmentations")
    p.add_argument(
        "-pred", required=True, nargs="+", action="append", metavar="PRED_FOLDER",
        help="prediction folder(s), one per run; repeat -pred or list several. The first is the baseline "
             "of the paired comparisons",
    )
    p.add_argument("-o", required=True, metavar="OUT", help="output folder for summary.json, report.md, PNGs")
    p.add_argument(
        "-l", type=int, default=None, metavar="TUMOUR_LABEL",
        help="tumour label value (default: guessed from dataset.json in a prediction folder, the reference "
             "folder or its parent; 1 without dataset.json)",
    )
    p.add_argument("--organ-label", type=int, default=None, help="also evaluate this organ label")
    p.add_argument("--names", nargs="+", default=None, help="display names of the runs (default: folder names)")
    p.add_argument("--tolerance-mm", type=float, default=5.0, help="surface Dice tolerance in mm (default 5)")
    p.add_argument(
        "--bootstrap", type=int, default=10000,
        help="bootstrap resamples of cases for confidence intervals, 0 for none (default 10000)",
    )
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument(
        "--lesion-iou", type=float, default=0.0,
        help="IoU a predicted component must exceed to detect a reference lesion (default 0: any overlap)",
    )
    p.add_argument(
        "--slice-bins", action="store_true",
        help="3D data: also report per-slice Dice (slices along the first array axis) in the 2D area bins",
    )
    p.add_argument(
        "--resample-to-reference", action="store_true",
        help="resample predictions whose voxel grid (spacing, origin, direction) differs from the reference onto "
             "the reference grid (nearest neighbour); without it such a prediction is refused",
    )
    p.add_argument("--file-ending", default=None, help="segmentation file ending (default: detected, e.g. .nii.gz)")
    add_num_processes_argument(p, "worker processes for the per-case metrics")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def evaluate_entry(argv: Sequence[str] | None = None) -> int:
    """Runs ``nnUNetv2_synth_evaluate``; ``argv`` defaults to ``sys.argv[1:]``.

    Returns:
        0 on success (errors exit with status 2 and a message naming the file or case at fault).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from .evaluate import EvaluationConfig, evaluate_folders  # torch/monai load only after parsing

    prediction_folders = [f for group in args.pred for f in group]
    if not 0 < args.confidence < 1:
        parser.error(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.tolerance_mm < 0:
        parser.error(f"--tolerance-mm must be >= 0, got {args.tolerance_mm}")
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.names is not None and len(args.names) != len(prediction_folders):
        parser.error(f"--names gives {len(args.names)} names for {len(prediction_folders)} prediction folders")
    # besides the common user errors: unreadable or mismatching segmentations (ValueError, RuntimeError)
    with exit_on_user_error(parser.prog, also=(ValueError, RuntimeError)):
        label, note = args.l, f"tumour label {args.l} (-l)"
        if label is None:
            label, note = guess_tumour_label(args.ref, prediction_folders)
            print(f"nnUNetv2_synth_evaluate: {note}", file=sys.stderr)
        config = EvaluationConfig(
            tumour_label=label,
            organ_label=args.organ_label,
            tolerance_mm=args.tolerance_mm,
            n_bootstrap=args.bootstrap,
            confidence=args.confidence,
            seed=args.seed,
            lesion_iou=args.lesion_iou,
            slice_bins=args.slice_bins,
            resample_to_reference=args.resample_to_reference,
        )
        summary = evaluate_folders(
            args.ref, prediction_folders, args.o, config=config, run_names=args.names,
            file_ending=args.file_ending, num_processes=args.num_processes, progress=not args.quiet, label_note=note,
        )
    print(f"nnUNetv2_synth_evaluate: {summary['n_cases']} cases, report in {args.o}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(evaluate_entry())
