"""``nnUNetv2_synth_convert COHORT -i INPUT -d DATASET_ID [options]``: one sub-command per cohort.

Each cohort module provides ``add_arguments(parser)`` for its own options and ``run(args)``; the options every
cohort shares are added here (``-np`` worker processes among them). Input problems end with exit status 2 and one
message naming case and file; an interrupted conversion resumes when the same command runs again (see
:func:`nnunet_synth.dataset_conversion.common.write_dataset`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from nnunet_synth.cli import HelpFormatter, add_num_processes_argument, exit_on_user_error

#: cohort -> (module, one-line help)
COHORTS: dict[str, tuple[str, str]] = {
    "msd_pancreas": ("msd", "MSD Task07_Pancreas (CT; pancreas 1, tumour 2)"),
    "msd_liver": ("msd", "MSD Task03_Liver (CT; liver 1, tumour 2)"),
    "pancreas_ct": ("pancreas_ct", "NIH Pancreas-CT from TCIA (DICOM + label NIfTI) as healthy controls"),
    "btcv": ("btcv", "BTCV Multi-Atlas Abdomen, one organ kept, as healthy controls"),
    "merge": ("merge", "merge a tumour dataset with healthy-control datasets (harmonised labels)"),
    "atlas": ("atlas", "ATLAS liver MRI (liver 1, tumour 2)"),
    "lld_mmri": ("lld_mmri", "LLD-MMRI 2023 multi-phase liver MRI with 3D lesion boxes"),
    "mama_mia": ("mama_mia", "MAMA-MIA breast DCE-MRI with expert tumour segmentations"),
    "duke_fgt": ("duke_fgt", "Duke-Breast-Cancer-MRI fibroglandular tissue / vessel masks (Slicer .seg.nrrd)"),
    "generic": ("generic", "a folder of images and masks (NIfTI, NRRD, MHA), optionally as 2D slices"),
}


def _module(cohort: str):
    return importlib.import_module(f"nnunet_synth.dataset_conversion.{COHORTS[cohort][0]}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per cohort."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_synth_convert",
        description="Convert a public cohort into nnUNet_raw/DatasetNNN_Name (see docs/conversion.md).")
    sub = parser.add_subparsers(dest="cohort", required=True, metavar="COHORT")
    for cohort, (_, help_text) in COHORTS.items():
        p = sub.add_parser(cohort, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if cohort == "merge":
            p.add_argument("-i", "--input", nargs="+", required=True, metavar="DATASET",
                           help="tumour dataset(s): ID, DatasetNNN_Name or folder")
        else:
            p.add_argument("-i", "--input", required=True, metavar="INPUT", help="the cohort as downloaded")
        p.add_argument("-d", "--dataset-id", type=int, required=True, metavar="ID",
                       help="ID (1-999) of the dataset this command creates in nnUNet_raw")
        p.add_argument("--name", default=None, help="dataset name (DatasetNNN_NAME); a default per cohort")
        p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder of that name")
        p.add_argument("--exclude", nargs="+", default=None, metavar="CASE", help="leave these input cases out")
        p.add_argument("--raw-dir", default=None, help="output root instead of $nnUNet_raw")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        add_num_processes_argument(p, "worker processes converting cases in parallel (1: in this process)")
        p.add_argument("--hide-tumours", type=float, default=None, metavar="MM",
                       help="hide the real tumours, dilated by MM mm, behind nnU-Net's ignore label and keep the "
                            "original labels in labelsTr_tumours/ (the synthetic-to-real transfer setting)")
        p.add_argument("--tumour-label", type=int, default=None, metavar="N",
                       help="with --hide-tumours: the tumour label value (default: from the label names)")
        _module(cohort).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        0 on success; a refused conversion (ConversionError, a missing file, ...) exits with status 2 and one
        line ``nnUNetv2_synth_convert COHORT: error: <message>`` on stderr.
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    with exit_on_user_error(f"nnUNetv2_synth_convert {args.cohort}"):
        if args.hide_tumours is None:
            folder = _module(args.cohort).run(args)
        else:
            from nnunet_synth.dataset_conversion.hidden_tumours import convert_hiding_tumours

            folder = convert_hiding_tumours(_module(args.cohort).run, args)
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
