"""Console entry points (``nnUNetv2_synth_*``) and the one way they report a user's mistake.

Every command runs inside :class:`exit_on_user_error`: an expected user error (an invalid synth plan, a missing or
mismatched generator checkpoint, an unknown dataset or configuration, an nnU-Net folder variable that is not set,
a missing file, ...) becomes one line ``<prog>: error: <message>`` on stderr and exit status 2, as argparse does for
a bad option; anything else is a bug and keeps its traceback.

Every command's parser follows nnU-Net's conventions with the helpers here: :class:`HelpFormatter` (each default
printed once, none for required options), :func:`add_deprecated_alias` (an old option spelling kept hidden for one
release, with a deprecation line) and :func:`add_num_processes_argument` (``-np`` with nnU-Net's default).
tests/test_cli_conventions.py checks every command's parser.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
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
    "nnunet_synth.bank": ("BankError",),
    "nnunet_synth.extras": ("MissingExtraError",),
}
# PermissionError: an output folder the user cannot write (read-only, another user's)
FILE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
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
    if isinstance(error, OSError) and error.errno == errno.EROFS:  # an output folder on a read-only file system
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


class HelpFormatter(argparse.HelpFormatter):
    """The help formatter of every command: an option's default is appended as ``(default: X)`` once, unless
    its help already says what the default is, the option is required, or it has no default worth printing
    (None, False, an empty string or list); a list default is shown as typed on the command line."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.help == argparse.SUPPRESS or not action.option_strings or action.required
                or re.search(r"\bdefault\b", text, re.IGNORECASE)
                or action.default is None or action.default is False or action.default is argparse.SUPPRESS
                or (isinstance(action.default, (str, list, tuple)) and not action.default)):
            return text
        return f"{text} (default: %(default)s)"

    def _expand_help(self, action: argparse.Action) -> str:
        if isinstance(action.default, (list, tuple)):
            action = copy.copy(action)
            action.default = " ".join(map(str, action.default))
        return super()._expand_help(action)


class _DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: sets the new option's destination and prints one deprecation line."""

    def __init__(self, option_strings: list[str], dest: str, replacement: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed in the next release; "
              f"use {self.replacement}", file=sys.stderr, flush=True)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_deprecated_alias(parser: argparse.ArgumentParser | argparse._ArgumentGroup, action: argparse.Action,
                         *old_spellings: str) -> None:
    """Keeps the old spellings of a renamed option for one release: hidden from ``--help``, they set ``action``'s
    destination and print ``<prog>: warning: OLD is deprecated ...; use NEW`` on stderr.

    Args:
        parser: the parser (or argument group) ``action`` was added to.
        action: the option under its new name, as ``add_argument`` returned it.
        old_spellings: the previous option strings, e.g. ``"--device"``.

    Example::

        add_deprecated_alias(parser, parser.add_argument("-device", ...), "--device")
    """
    parser.add_argument(*old_spellings, action=_DeprecatedAlias, replacement=action.option_strings[0],
                        dest=action.dest, nargs=action.nargs, const=action.const, type=action.type,
                        choices=action.choices, metavar=action.metavar, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)


def add_num_processes_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                               what: str = "worker processes") -> argparse.Action:
    """``-np N`` (destination ``num_processes``) with nnU-Net's default: ``default_num_processes`` of
    ``nnunetv2.configuration`` (8, or the environment variable ``nnUNet_def_n_proc``)."""
    from nnunetv2.configuration import default_num_processes

    return parser.add_argument("-np", type=int, default=default_num_processes, dest="num_processes", metavar="NP",
                               help=f"{what} (default: nnU-Net's default_num_processes, here "
                                    f"{default_num_processes}; set by nnUNet_def_n_proc)")


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
    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_demo", formatter_class=HelpFormatter,
                                     description="Phantom -> nnU-Net planning -> synth plan -> Synth training -> "
                                     "prediction -> Dice -> preview PNGs (CPU).")
    parser.add_argument("-o", "--output", default="nnunet_synth_demo",
                        help="demo folder: its own nnUNet_raw, nnUNet_preprocessed, nnUNet_results, predictions, "
                        "previews and logs")
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainerSynth20_Demo", help="trainer to train with")
    parser.add_argument("--modality", choices=["CT", "MRI"], default="CT", help="phantom modality")
    parser.add_argument("--num-train", type=int, default=10, help="phantom training cases (at least 5)")
    parser.add_argument("--num-test", type=int, default=3, help="held-out phantom cases predicted and scored")
    args = parser.parse_args()
    from nnunet_synth.demo import run_demo

    run_demo(args.output, args.trainer, args.num_train, args.num_test, args.modality)


@exit_on_user_error("nnUNetv2_synth_preview")
def preview_entry() -> None:
    """nnUNetv2_synth_preview -d DATASET [-c CONFIG] -n 8 -o DIR [-g BACKEND ...]"""
    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_preview", formatter_class=HelpFormatter,
                                     description="PNGs of a real tumour of the dataset (blue) next to the synthetic "
                                     "tumour of each backend (red), zoomed, at one grey window per channel.")
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or ID (preprocessed)")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-n", "--num", type=int, default=8, help="preview PNGs to write")
    parser.add_argument("-o", "--output", default="synth_preview", help="output folder for the PNGs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cases, patches and lesions shown")
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
    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_export", formatter_class=HelpFormatter,
                                     description="Rewrite a Synth training's checkpoints so that plain nnU-Net "
                                     "(no nnUNet_extTrainer) predicts with them.")
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or ID of the training")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration of the training")
    parser.add_argument("-tr", "--trainer", required=True, help="Synth trainer class of the training")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier of the training")
    parser.add_argument("-f", "--folds", nargs="+", help="folds to export (default: all finished ones)")
    parser.add_argument("-o", "--output", required=True,
                        help="folder (an nnUNet_results tree) or .zip (for nnUNetv2_install_pretrained_model_from_zip)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing zip file, or this model in an existing output folder")
    args = parser.parse_args()
    from nnunet_synth.export import export_model

    out = export_model(args.dataset, args.trainer, args.configuration, args.output, args.folds, args.plans,
                       overwrite=args.overwrite)
    print(f"exported to {out}")


@exit_on_user_error("nnUNetv2_synth_phantom", also=(ValueError,))
def phantom_entry() -> None:
    """nnUNetv2_synth_phantom -d ID [--modality CT|MRI] [--healthy] [--num-train N] [--num-test N]"""
    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_phantom", formatter_class=HelpFormatter,
                                     description="Write a procedural phantom dataset into nnUNet_raw.")
    parser.add_argument("-d", "--dataset-id", type=int, required=True, metavar="ID",
                        help="ID of the dataset this command creates in nnUNet_raw (DatasetNNN_PhantomCT, ...)")
    parser.add_argument("--modality", choices=["CT", "MRI"], default="CT", help="phantom modality")
    parser.add_argument("--healthy", action="store_true", help="training cases without tumours (label-free)")
    parser.add_argument("--num-train", type=int, default=10, help="training cases (imagesTr)")
    parser.add_argument("--num-test", type=int, default=3, help="held-out test cases (imagesTs, labelsTs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantoms")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder of that ID")
    parser.add_argument("--hide-tumours", type=float, default=None, metavar="MM",
                        help="hide the training tumours, dilated by MM mm, behind nnU-Net's ignore label (true labels "
                             "kept in labelsTr_tumours/): the synthetic-to-real transfer setting")
    args = parser.parse_args()
    from nnunet_synth.phantom import write_phantom_dataset

    path = write_phantom_dataset(args.dataset_id, args.num_train, args.num_test, args.modality, args.healthy,
                                 args.seed, overwrite=args.overwrite, hide_tumours_mm=args.hide_tumours)
    print(f"wrote {path}")
