"""``nnUNetv2_synth_masks``: write synthetic lesion masks as NIfTI (with the dataset's spacing) and one PNG
grid per size class and deformation, to inspect the shape engine in a viewer.

The lesion pipeline, plotting and image libraries are imported where they are used, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from nnunet_synth.generators.paths import DEFAULT_PLANS_IDENTIFIER

DESCRIPTION = ("Write synthetic lesion masks as NIfTI (with the dataset's spacing) and one PNG grid per size class "
               "and deformation, to inspect the shape engine in a viewer.")


def write_masks(dataset: str | int, num: int, output_dir: str | Path, configuration: str = "3d_fullres",
                size_classes: list[str] | None = None, deformations: list[str] | None = None, fold: int = 0,
                seed: int = 0, plans_identifier: str = DEFAULT_PLANS_IDENTIFIER) -> list[Path]:
    """Writes ``num`` masks per size class and deformation, drawn by the lesion pipeline; returns the PNG grids."""
    import SimpleITK as sitk
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tqdm import tqdm

    from nnunet_synth.generators.lesions import draw_masks
    from nnunet_synth.generators.sizes import class_names
    from nnunet_synth.generators.splits import split_cases
    from nnunet_synth.generators.templates import fold_templates
    from nnunet_synth.planning import load_synth_plan, preprocessed_dir

    plan = load_synth_plan(dataset, configuration, plans_identifier)
    base = preprocessed_dir(dataset)
    spacing = tuple(plan.spacing)
    classes = size_classes or [*class_names(plan.shapes.size_preset)] or ["any"]
    deformations = deformations or ["elastic", "simplex"]
    templates = None
    if "template" in deformations:
        conf = PlansManager(load_json(base / f"{plans_identifier}.json")).get_configuration(configuration)
        train_cases, _, _ = split_cases(dataset, configuration, fold, plans_identifier)
        templates, _ = fold_templates(base, conf, plan, train_cases, textures=False)  # shapes only
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grids = []
    for size_class in classes:
        for deformation in deformations:
            shaped = plan.replace(shapes={"size_class": size_class, "deformation": deformation}).validated(
                f"synth plan of {plan.dataset_name} with --size-class {size_class} --deformation {deformation}")
            masks = []
            for i in tqdm(range(num), desc=f"masks {size_class}/{deformation}", unit="mask"):
                mask = draw_masks(shaped, spacing, rng, templates)[0][1]  # one lesion each, also for counted classes
                masks.append(mask)
                image = sitk.GetImageFromArray(mask.astype(np.uint8))
                image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
                sitk.WriteImage(image, str(out / f"{size_class}_{deformation}_{i:03d}.nii.gz"), useCompression=True)
            name = f"{size_class}_{deformation}"
            grids.append(_grid(masks, spacing, f"{size_class} / {deformation}", out / f"{name}.png"))
    return grids


def _grid(masks: list[np.ndarray], spacing: tuple[float, ...], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunet_synth.generators.shapes import equivalent_diameter_mm

    cols = min(8, len(masks))
    rows = int(np.ceil(len(masks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.0 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, mask in zip(axes.ravel(), masks):
        middle = mask[mask.shape[0] // 2] if mask.ndim == 3 else mask
        ax.imshow(middle, cmap="gray", aspect=spacing[-2] / spacing[-1], interpolation="nearest")
        ax.set_title(f"{equivalent_diameter_mm(int(mask.sum()), spacing):.1f} mm", fontsize=7)
    fig.suptitle(f"{title} (central axial slice, equivalent diameter)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    from nnunet_synth.cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_masks", description=DESCRIPTION,
                                     formatter_class=HelpFormatter)
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or ID (preprocessed, with a synth plan)")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration")
    parser.add_argument("-n", "--num", type=int, default=8, help="masks per size class and deformation")
    parser.add_argument("--size-class", nargs="+", help="size classes (default: every class of the plan's size "
                        "preset)")
    parser.add_argument("--deformation", nargs="+", choices=["elastic", "simplex", "none", "template"],
                        help="deformations (default: elastic and simplex)")
    parser.add_argument("-f", "--fold", type=int, default=0, help="fold whose training cases give the templates")
    parser.add_argument("-p", "--plans", default=DEFAULT_PLANS_IDENTIFIER, help="plans identifier")
    parser.add_argument("-o", "--output", required=True, help="output folder for the NIfTI masks and PNG grids")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask draws")
    args = parser.parse_args(argv)
    grids = write_masks(args.dataset, args.num, args.output, args.configuration, args.size_class, args.deformation,
                        args.fold, args.seed, args.plans)
    print(f"wrote masks and {len(grids)} PNG grids to {args.output}")
