"""``nnUNetv2_synth_masks``: write synthetic lesion masks as NIfTI (with the dataset's spacing) and one PNG
grid per size class and deformation, to inspect the shape engine in a viewer."""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from batchgenerators.utilities.file_and_folder_operations import load_json  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nnunet_synth.generators.shapes import DEFORMATIONS, equivalent_diameter_mm  # noqa: E402
from nnunet_synth.generators.sizes import class_names, lesion_requests  # noqa: E402
from nnunet_synth.generators.templates import build_template_bank, load_templates, template_file  # noqa: E402
from nnunet_synth.injection import SynthTumourTransform  # noqa: E402
from nnunet_synth.planning import load_synth_plan, preprocessed_dir  # noqa: E402


def training_cases(base: Path, fold: int) -> set[str] | None:
    """Training cases of a fold from nnU-Net's splits_final.json (None: no split yet, use every case)."""
    splits = base / "splits_final.json"
    return set(load_json(splits)[fold]["train"]) if splits.is_file() else None


def write_masks(dataset: str | int, num: int, output_dir: str | Path, configuration: str = "3d_fullres",
                size_classes: list[str] | None = None, deformations: list[str] | None = None, fold: int = 0,
                seed: int = 0) -> list[Path]:
    """Writes ``num`` masks per size class and deformation; returns the PNG grids."""
    plan = load_synth_plan(dataset, configuration)
    base = preprocessed_dir(dataset)
    spacing = tuple(plan["spacing"])
    classes = size_classes or [*class_names(plan["shapes"]["size_preset"])] or ["any"]
    deformations = deformations or ["elastic", "simplex"]
    templates = None
    if "template" in deformations:
        path = template_file(base, configuration)
        if not path.is_file():
            conf = load_json(base / f"{plan['plans_identifier']}.json")["configurations"][configuration]
            build_template_bank(base, configuration, conf["data_identifier"], plan["tumour_label"])
        cases = training_cases(base, fold)
        with np.load(path) as z:
            everything = {str(c) for c in z["case_ids"]}
        templates, _ = load_templates(path, cases if cases is not None else everything)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grids = []
    for size_class in classes:
        for deformation in deformations:
            shaped = dict(plan, shapes=dict(plan["shapes"], size_class=size_class,
                                            deformation=deformation if deformation in DEFORMATIONS else "template"))
            transform = SynthTumourTransform(shaped, 1.0, None, seed, templates=templates)
            masks = []
            for i in tqdm(range(num), desc=f"masks {size_class}/{deformation}", unit="mask"):
                request = lesion_requests(shaped, spacing, rng)[0]  # one lesion each, also for counted classes
                mask = transform.lesion_mask(request.radii_mm, spacing, rng)
                masks.append(mask)
                image = sitk.GetImageFromArray(mask.astype(np.uint8))
                image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
                sitk.WriteImage(image, str(out / f"{size_class}_{deformation}_{i:03d}.nii.gz"), useCompression=True)
            name = f"{size_class}_{deformation}"
            grids.append(_grid(masks, spacing, f"{size_class} / {deformation}", out / f"{name}.png"))
    return grids


def _grid(masks: list[np.ndarray], spacing: tuple[float, ...], title: str, path: Path) -> Path:
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
    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_masks", description=__doc__)
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-n", "--num", type=int, default=8, help="masks per size class and deformation")
    parser.add_argument("--size-class", nargs="+", help="default: every class of the plan's size preset")
    parser.add_argument("--deformation", nargs="+", choices=["elastic", "simplex", "none", "template"],
                        help="default: elastic and simplex")
    parser.add_argument("-f", "--fold", type=int, default=0, help="fold whose training cases give the templates")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    grids = write_masks(args.dataset, args.num, args.output, args.configuration, args.size_class, args.deformation,
                        args.fold, args.seed)
    print(f"wrote masks and {len(grids)} PNG grids to {args.output}")
