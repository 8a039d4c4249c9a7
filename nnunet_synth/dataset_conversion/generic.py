"""A folder of images and masks (NIfTI, NRRD, MHA), one or several channels, optionally as 2D axial slices.

Files are found by patterns relative to ``-i`` in which ``{case}`` stands for the case name and ``*`` for any
characters within one path component::

    nnUNetv2_synth_convert generic -i DIR -d 600 \\
        --image-pattern 'images/{case}_t1.nii.gz' 'images/{case}_t2.nrrd' --channel-names T1 T2 \\
        --label-pattern 'masks/{case}.mha' --labels background=0 breast=1 tumor=2

Defaults: ``images/{case}.*`` (one channel) and ``labels/{case}.*``; labels ``background=0 tumor=1``. Cases are
the names that any pattern matches; a case without a file for every channel and a label is refused. ``--binarize``
turns every non-zero mask value into the one foreground label (1 by default). A separate organ mask per case
(``--organ-pattern``, e.g. BraTS's ``brainmask.nii.gz`` beside ``OTMultiClass.nii.gz``) is merged in: its
voxels become the organ label (``--organ-label NAME``, default ``organ``; a name of ``--labels`` or a new label
with the next value) wherever the label mask holds background, so a tumour keeps its label inside the organ::

    nnUNetv2_synth_convert generic -i brats2013_sample -d 920 \
        --image-pattern '{case}/Flair_subtrMeanDivStd.nii.gz' '{case}/T1c_subtrMeanDivStd.nii.gz' \
        --channel-names FLAIR T1c --label-pattern '{case}/OTMultiClass.nii.gz' --binarize \
        --labels background=0 brain=1 tumour=2 --organ-pattern '{case}/brainmask.nii.gz' --organ-label brain

``--slices`` writes every axial slice (or, with ``--slice-selection
foreground``, those with foreground) as its own 2D case ``<case>_sNNN`` for a 2d-only dataset, as the breast 2D
paper trained on axial slices; the axial axis is the image axis closest to the patient's head-foot direction.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_synth.dataset_conversion.common import (
    CaseTask,
    ConversionError,
    DatasetSpec,
    Geometry,
    OutputCase,
    align_to_reference,
    check_alignable,
    check_same_geometry,
    image_from_array,
    label_array,
    parse_label_spec,
    read_header,
    read_image,
    remap_labels,
    resample_to_spacing,
    resumable,
    sanitize_identifier,
    strip_image_suffix,
    write_dataset,
)


def pattern_regex(pattern: str) -> re.Pattern:
    """Regex for a file pattern with one ``{case}`` placeholder and ``*`` wildcards.

    Raises:
        ConversionError: The pattern lacks ``{case}`` or has it twice.
    """
    if pattern.count("{case}") != 1:
        raise ConversionError(f"pattern {pattern!r} must contain {{case}} exactly once")
    parts = [re.escape(p).replace(r"\*", r"[^/]*") for p in pattern.split("{case}")]
    return re.compile(parts[0] + r"(?P<case>[^/]+?)" + parts[1] + r"$")


def _scan(root: Path, patterns: list[str]) -> list[dict[str, list[Path]]]:
    """For each pattern: case name -> matching files (supported image files only, macOS ``._*`` skipped)."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and strip_image_suffix(p.name) is not None]
    rel = [(p, p.relative_to(root).as_posix()) for p in files]
    out = []
    for pattern in patterns:
        regex, found = pattern_regex(pattern), {}
        for path, text in rel:
            if m := regex.match(text):
                found.setdefault(m.group("case"), []).append(path)
        out.append(found)
    return out


def _axial_axis(image: sitk.Image) -> int:
    """Numpy axis (of the z, y, x array) whose direction is closest to the head-foot axis."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(direction[2])))


def _slice(image: sitk.Image, axis: int, index: int) -> sitk.Image:
    arr = np.take(sitk.GetArrayViewFromImage(image), index, axis=axis)
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    spacing_zyx = image.GetSpacing()[::-1]
    in_plane = [spacing_zyx[a] for a in range(3) if a != axis]  # (rows, cols) of the 2D array
    out.SetSpacing((in_plane[1], in_plane[0]))
    return out


@resumable
def convert(input_dir: str | os.PathLike, dataset_id: int, *, name: str | None = None, overwrite: bool = False,
            raw_dir: str | os.PathLike | None = None, exclude: list[str] | None = None,
            image_patterns: list[str] | None = None, label_pattern: str = "labels/{case}.*",
            channel_names: list[str] | None = None, labels: list[str] | None = None, binarize: bool = False,
            spacing: list[float] | None = None, slices: bool = False, slice_selection: str = "all",
            case_prefix: str = "", organ_pattern: str | None = None, organ_label: str = "organ",
            progress: bool = True, num_processes: int = 1) -> Path:
    """Convert a folder of images and masks.

    Args:
        input_dir: Root the patterns are relative to.
        dataset_id: nnU-Net dataset ID.
        name: Dataset name (default Generic).
        overwrite: Replace an existing dataset folder of the same name.
        raw_dir: Output root instead of ``nnUNet_raw``.
        exclude: Case names to leave out.
        image_patterns: One pattern per channel (default ``["images/{case}.*"]``).
        label_pattern: Pattern of the masks.
        channel_names: One name per channel (``CT`` selects nnU-Net's CT normalisation).
        labels: ``NAME=VALUE`` items (default ``background=0 tumor=1``).
        binarize: Map every non-zero value of the label mask to the one foreground label (besides the organ's).
        spacing: Resample 3D cases to this spacing in mm (one value: isotropic; three: x, y, z).
        slices: Write 2D axial slices instead of volumes.
        slice_selection: ``all`` slices or only those with ``foreground``.
        case_prefix: Prefix of the output case identifiers.
        organ_pattern: Pattern of a separate organ mask (any non-zero voxel is organ), merged into the label
            where the label mask holds background.
        organ_label: Name of the label the organ mask writes: one of ``labels``, or a new label with the next
            value.
        progress: Show progress bars.
        num_processes: Worker processes converting cases (1: in this process).

    Returns:
        The written dataset folder.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise ConversionError(f"input folder not found: {root}")
    image_patterns = list(image_patterns or ["images/{case}.*"])
    channel_names = list(channel_names or (["image"] if len(image_patterns) == 1
                                           else [f"image{i}" for i in range(len(image_patterns))]))
    if len(channel_names) != len(image_patterns):
        raise ConversionError(f"{len(image_patterns)} image pattern(s) but {len(channel_names)} channel name(s)")
    label_dict = parse_label_spec(labels or ["background=0", "tumor=1"])
    organ_value = None
    if organ_pattern is not None:
        organ_value = label_dict.setdefault(organ_label, max(label_dict.values()) + 1)
        if organ_value == 0:
            raise ConversionError(f"--organ-label {organ_label!r} is the background label")
    foreground = sorted(v for v in label_dict.values() if v not in (0, organ_value))
    if binarize and len(foreground) != 1:
        raise ConversionError("--binarize needs exactly one foreground label (e.g. --labels background=0 tumor=1)"
                              + (" besides the organ label" if organ_pattern is not None else ""))
    if slice_selection not in ("all", "foreground"):
        raise ConversionError(f"--slice-selection must be all or foreground, got {slice_selection!r}")
    if spacing is not None and (len(spacing) not in (1, 3) or min(spacing) <= 0):
        raise ConversionError(f"--spacing takes one or three positive values, got {spacing}")

    mask_patterns = [label_pattern] + ([organ_pattern] if organ_pattern is not None else [])
    *channel_maps, label_map = _scan(root, image_patterns + [label_pattern])
    organ_map = _scan(root, [organ_pattern])[0] if organ_pattern is not None else None
    names = sorted(set(label_map).union(*channel_maps, organ_map or ()))
    if not names:
        raise ConversionError(f"{root}: no file matches {image_patterns + mask_patterns}")
    unknown = set(exclude or ()) - set(names)
    if unknown:
        raise ConversionError(f"--exclude names unknown case(s): {sorted(unknown)}")
    names = [n for n in names if n not in set(exclude or ())]
    for case in names:
        for what, found, pattern in [*((f"channel {c} ({channel_names[c]})", m, p) for c, (m, p)
                                       in enumerate(zip(channel_maps, image_patterns, strict=True))),
                                     ("label", label_map, label_pattern),
                                     *([("organ mask", organ_map, organ_pattern)] if organ_map is not None else [])]:
            if case not in found:
                raise ConversionError(f"case {case}: {what} missing: no file matches "
                                      f"{root / pattern.replace('{case}', case)}")
            if len(found[case]) > 1:
                raise ConversionError(f"case {case}: {what} is ambiguous, several files match "
                                      f"{pattern.replace('{case}', case)}: {[str(p) for p in found[case]]}")
    mapping = None if binarize else {v: v for v in label_dict.values()}

    def make_task(case: str) -> CaseTask:
        img_paths = [m[case][0] for m in channel_maps]
        lab_path = label_map[case][0]
        organ_path = organ_map[case][0] if organ_map is not None else None
        out_id = sanitize_identifier(case_prefix + case)

        def check() -> None:
            g_ref = None
            for p in img_paths:
                g, comps = read_header(p, case=case)
                if g.ndim != 3 or comps != 1:
                    raise ConversionError(f"case {case}: expected one 3D single-component image per channel, got "
                                          f"{g.ndim}D with {comps} component(s): {p}")
                if g_ref is None:
                    g_ref = g
                else:
                    check_same_geometry(g_ref, g, case=case, what=f"channel file {p.name}", files=(img_paths[0], p))
            check_alignable(read_header(lab_path, case=case)[0], g_ref, case=case, what="label",
                            files=(img_paths[0], lab_path))
            if organ_path is not None:
                check_alignable(read_header(organ_path, case=case)[0], g_ref, case=case, what="organ mask",
                                files=(img_paths[0], organ_path))

        def load() -> list[OutputCase]:
            images = [read_image(p, case=case) for p in img_paths]
            for p, im in zip(img_paths[1:], images[1:], strict=True):
                check_same_geometry(Geometry.of(images[0]), Geometry.of(im), case=case,
                                    what=f"channel file {p.name}", files=(img_paths[0], p))
                im.CopyInformation(images[0])
            label = align_to_reference(read_image(lab_path, case=case), images[0], case=case, what="label",
                                       files=(img_paths[0], lab_path))
            arr = label_array(label, case=case, file=lab_path)
            arr = ((arr != 0) * foreground[0]).astype(np.uint8) if mapping is None else remap_labels(
                arr, mapping, case=case, file=lab_path)
            if organ_path is not None:
                organ = align_to_reference(read_image(organ_path, case=case), images[0], case=case,
                                           what="organ mask", files=(img_paths[0], organ_path))
                arr[(sitk.GetArrayViewFromImage(organ) != 0) & (arr == 0)] = organ_value
            label = image_from_array(arr, images[0])
            if spacing is not None:
                images = [resample_to_spacing(im, spacing, is_label=False) for im in images]
                label = resample_to_spacing(label, spacing, is_label=True)
            sources = (*img_paths, lab_path, *([organ_path] if organ_path is not None else []))
            if not slices:
                return [OutputCase(out_id, images, label, sources)]
            axis = _axial_axis(images[0])
            lab_arr = sitk.GetArrayViewFromImage(label)
            count = lab_arr.shape[axis]
            keep = [i for i in range(count) if slice_selection == "all" or np.take(lab_arr, i, axis=axis).any()]
            width = max(3, len(str(count - 1)))
            return [OutputCase(f"{out_id}_s{i:0{width}d}", [_slice(im, axis, i) for im in images],
                               _slice(label, axis, i), sources) for i in keep]

        return CaseTask(case, load, check)

    spec = DatasetSpec(dataset_id, name or "Generic", dict(enumerate(channel_names)), label_dict, cohort="generic",
                       description="converted from a folder of images and masks"
                       + (f" as 2D axial slices ({slice_selection})" if slices else ""),
                       ndim=2 if slices else 3, extra={"source_patterns": image_patterns + mask_patterns})
    return write_dataset(spec, [make_task(c) for c in names], overwrite=overwrite, raw_dir=raw_dir, progress=progress,
                         num_processes=num_processes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Cohort options."""
    parser.add_argument("--image-pattern", nargs="+", default=None, metavar="PATTERN",
                        help="one pattern per channel, relative to -i, with {case} and * (default images/{case}.*)")
    parser.add_argument("--label-pattern", default="labels/{case}.*", metavar="PATTERN", help="pattern of the masks")
    parser.add_argument("--channel-names", nargs="+", default=None, metavar="NAME",
                        help="one per channel (CT selects CT normalisation)")
    parser.add_argument("--labels", nargs="+", default=None, metavar="NAME=VALUE",
                        help="label names and values (default background=0 tumor=1)")
    parser.add_argument("--binarize", action="store_true",
                        help="map every non-zero value of the label mask to the one foreground label (besides the "
                        "organ label)")
    parser.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                        help="resample to this spacing (one value: isotropic)")
    parser.add_argument("--slices", action="store_true", help="write 2D axial slices (a 2d dataset)")
    parser.add_argument("--slice-selection", choices=("all", "foreground"), default="all",
                        help="with --slices: every slice or only slices with foreground")
    parser.add_argument("--case-prefix", default="", help="prefix of the output case identifiers")
    parser.add_argument("--organ-pattern", default=None, metavar="PATTERN",
                        help="pattern of a separate organ mask per case (non-zero = organ), e.g. "
                        "{case}/brainmask.nii.gz: written as the organ label where the label mask holds background")
    parser.add_argument("--organ-label", default="organ", metavar="NAME",
                        help="with --organ-pattern: the label the organ mask writes, a name of --labels or a new "
                        "label with the next value")


def run(args: argparse.Namespace) -> Path:
    """Entry from the command line."""
    return convert(args.input, args.dataset_id, name=args.name, overwrite=args.overwrite, raw_dir=args.raw_dir,
                   exclude=args.exclude, image_patterns=args.image_pattern, label_pattern=args.label_pattern,
                   channel_names=args.channel_names, labels=args.labels, binarize=args.binarize,
                   spacing=args.spacing, slices=args.slices, slice_selection=args.slice_selection,
                   case_prefix=args.case_prefix, organ_pattern=args.organ_pattern, organ_label=args.organ_label,
                   progress=not args.quiet, num_processes=args.num_processes)
