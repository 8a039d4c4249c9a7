"""Console entry points (``nnUNetv2_synth_*``) and the one way they report a user's mistake.

Every command runs inside :class:`exit_on_user_error`: an expected user error (an invalid synth plan, a missing or
mismatched generator checkpoint, an unknown dataset or configuration, an nnU-Net folder variable that is not set,
a missing file, ...) becomes one line ``<prog>: error: <message>`` on stderr and exit status 2, as argparse does for
a bad option; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys

# Project exception classes that always mean a user error, by module. They are looked up in sys.modules when an
# exception arrives: an exception cannot be an instance of a class whose module was never imported, so this
# module imports nothing heavy and every command may use it.
USER_ERROR_CLASSES = {
    "nnunet_synth.synth_plan": ("SynthPlanError",),
    "nnunet_synth.generators.checkpoints": ("GeneratorCheckpointError",),
    "nnunet_synth.generators.sd_inversion.components": ("BaseModelError",),
    "nnunet_synth.evaluation.quality": ("QualityError",),
    "nnunet_synth.evaluation.encoder_features": ("EncoderError",),
    "nnunet_synth.dataset_conversion.common": ("ConversionError",),
}
FILE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
# nnU-Net has no exception classes of its own: these messages of its RuntimeErrors/ValueErrors are user errors
# (an unset folder variable, an unknown or ambiguous dataset, a dataset name that is neither name nor ID, an
# unknown configuration of the plans).
NNUNET_USER_MESSAGES = re.compile(
    r"nnUNet_(raw|preprocessed|results) is not (defined|set)"
    r"|Could not find a dataset with the ID"
    r"|More than one dataset name found for dataset id"
    r"|dataset_name_or_id was a string"
    r"|Requested configuration .* not found in plans")


def _project_error_classes() -> tuple[type[BaseException], ...]:
    classes = []
    for module_name, names in USER_ERROR_CLASSES.items():
        module = sys.modules.get(module_name)
        classes.extend(getattr(module, name) for name in names if module is not None and hasattr(module, name))
    return tuple(classes)


def is_user_error(error: BaseException, also: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether ``error`` is a user's mistake to report in one line (``also``: a command's own such classes)."""
    if isinstance(error, FILE_ERRORS + _project_error_classes() + tuple(also)):
        return True
    return isinstance(error, (RuntimeError, ValueError)) and NNUNET_USER_MESSAGES.search(str(error)) is not None


def error_line(error: BaseException) -> str:
    """The message of ``error`` on one line (a KeyError's without the quotes its ``str`` adds); the exception's
    type name where it has no message."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]
    else:
        text = str(error)
    return " ".join(text.split()) or type(error).__name__  # one line, runs of whitespace as one space


class exit_on_user_error(contextlib.ContextDecorator):  # noqa: N801 - used like a function
    """Decorator or context manager of a console command: a user error exits with status 2 and one stderr line
    ``<prog>: error: <message>``, without a traceback; other exceptions pass unchanged.

    Args:
        prog: the command name (the prefix of the line).
        also: exception classes that are user errors for this command only (e.g. ValueError of its own checks).

    Example::

        @exit_on_user_error("nnUNetv2_synth_generate", also=(ValueError,))
        def main(argv=None): ...
    """

    def __init__(self, prog: str, also: tuple[type[BaseException], ...] = ()):
        self.prog = prog
        self.also = tuple(also)

    def __enter__(self) -> exit_on_user_error:
        return self

    def __exit__(self, exc_type, error, traceback) -> bool:
        if error is None or not isinstance(error, Exception) or not is_user_error(error, self.also):
            return False
        sys.stdout.flush()
        print(f"{self.prog}: error: {error_line(error)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


@exit_on_user_error("nnUNetv2_synth_plan")
def plan_entry(argv: list[str] | None = None) -> None:
    """nnUNetv2_synth_plan -d DATASET [-c CONFIG] [--organ-label N] [--tumour-label N] [--overwrite]"""
    from nnunet_synth.planning import main

    main(argv)


@exit_on_user_error("nnUNetv2_synth_masks")
def masks_entry(argv: list[str] | None = None) -> None:
    """nnUNetv2_synth_masks -d DATASET -o DIR [-n N] [--size-class ...] [--deformation ...]"""
    from nnunet_synth.masks import main

    main(argv)


@exit_on_user_error("nnUNetv2_synth_demo", also=(ValueError,))
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


@exit_on_user_error("nnUNetv2_synth_preview")
def preview_entry() -> None:
    """nnUNetv2_synth_preview -d DATASET [-c CONFIG] -n 8 -o DIR [-g BACKEND ...]"""
    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_preview", description="PNGs of a real tumour of the "
                                     "dataset (blue) next to the synthetic tumour of each backend (red), zoomed, "
                                     "at one grey window per channel.")
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-n", "--num", type=int, default=8)
    parser.add_argument("-o", "--output", default="synth_preview")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-g", "--generator", nargs="+", metavar="BACKEND",
                        help="backends to compare, one row each (default: the synth plan's backend)")
    args = parser.parse_args()
    from nnunet_synth.preview import write_previews

    paths = write_previews(args.dataset, args.configuration, args.num, args.output, args.plans, args.seed,
                           args.generator)
    print(f"wrote {len(paths)} previews to {args.output}")


@exit_on_user_error("nnUNetv2_synth_export", also=(ValueError,))
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


@exit_on_user_error("nnUNetv2_synth_phantom", also=(ValueError,))
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
