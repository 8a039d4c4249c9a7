"""PNG previews of real training patches before and after synthesis, the synthetic tumour outlined."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nnunet_synth.generators.lesions import placement_region  # noqa: E402
from nnunet_synth.injection import SynthTumourTransform  # noqa: E402
from nnunet_synth.planning import load_synth_plan, preprocessed_dir  # noqa: E402
from nnunet_synth.synth_plan import SynthPlan  # noqa: E402

PLANES = ("axial", "coronal", "sagittal")


def _slices(volume: np.ndarray, centre: tuple[int, ...]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices through ``centre`` of a (z, y, x) volume (one slice for 2D)."""
    if volume.ndim == 2:
        return [volume]
    z, y, x = centre
    return [volume[z], volume[:, y], volume[:, :, x]]


def _aspects(spacing: tuple[float, ...]) -> list[float]:
    if len(spacing) == 2:
        return [spacing[0] / spacing[1]]
    sz, sy, sx = spacing
    return [sy / sx, sz / sx, sz / sy]


def render_preview(image: np.ndarray, seg: np.ndarray, new_image: np.ndarray, lesion: np.ndarray,
                   spacing: tuple[float, ...], title: str, path: Path) -> None:
    """Writes a PNG: rows before/after, columns the planes through the lesion centre, lesion outlined.

    Args:
        image: (C, *spatial) patch before synthesis; channel 0 is shown.
        seg: (*spatial) segmentation before synthesis (real tumours are outlined in blue).
        new_image: (C, *spatial) patch after synthesis.
        lesion: (*spatial) bool mask of the synthetic tumour (outlined in red).
        spacing: voxel spacing, for the aspect ratio.
        title: figure title.
        path: output PNG.
    """
    centre = tuple(int(round(c)) for c in np.argwhere(lesion).mean(0))
    lo, hi = np.percentile(image[0], [1, 99])
    cols = 1 if lesion.ndim == 2 else 3
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 6.4), squeeze=False)
    for row, (label, img) in enumerate((("before", image), ("after", new_image))):
        for col, (im, les, real, aspect) in enumerate(zip(_slices(img[0], centre), _slices(lesion, centre),
                                                          _slices(seg, centre), _aspects(spacing))):
            ax = axes[row, col]
            ax.imshow(im, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            if row == 1 and les.any():
                ax.contour(les, levels=[0.5], colors="red", linewidths=1.0)
            if real.any():
                ax.contour(real, levels=[0.5], colors="deepskyblue", linewidths=0.6)
            ax.set_title(f"{label}: {PLANES[col] if cols == 3 else 'slice'}", fontsize=9)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class SyntheticPatch:
    """One patch of a preprocessed case with a synthetic tumour inserted (see :func:`draw_synthetic_patch`).

    Attributes:
        bbox: the patch's box ``[[start, stop), ...]`` over the spatial axes of ``slice_index``'s volume, in voxel
            coordinates of the case (it may reach outside the case; those voxels are padding).
        slice_index: for a 2d configuration the index (first axis) of the case slice the patch was cut from,
            else None.
        image: (C, *patch) float32 patch before synthesis.
        labels: (1, *patch) int16 segmentation before synthesis (-1 outside the case).
        new_image: (C, *patch) patch after synthesis.
        new_labels: (1, *patch) segmentation after synthesis.
        lesion: (*patch) bool mask of the synthetic tumour.
    """

    bbox: list[list[int]]
    slice_index: int | None
    image: torch.Tensor
    labels: torch.Tensor
    new_image: torch.Tensor
    new_labels: torch.Tensor
    lesion: np.ndarray


def draw_synthetic_patch(data: np.ndarray, seg: np.ndarray, plan: SynthPlan, transform: SynthTumourTransform,
                         patch: tuple[int, ...], rng: np.random.Generator) -> SyntheticPatch | None:
    """Cuts a patch around a random placement voxel (organ, or tissue region without organ label) of a
    preprocessed case and inserts the synthetic tumours of one sample.

    Args:
        data: (C, *spatial) preprocessed image of the case.
        seg: (1, *spatial) preprocessed segmentation of the case.
        plan: the synth plan.
        transform: the transform whose ``insert`` places and synthesises the lesion.
        patch: patch size; two axes for a 2d configuration (a slice of the 3D case).
        rng: random generator (centre, placement and texture).

    Returns:
        The patch before and after synthesis, or None when the case has no placement voxel or nothing fits.
    """
    # the pipeline's own placement region: the organ label, or the tissue region where there is none
    region = np.argwhere(placement_region(np.asarray(data), np.asarray(seg[0]), plan))
    if len(region) == 0:
        return None
    centre = region[rng.integers(len(region))]
    bbox = [[int(c) - p // 2, int(c) - p // 2 + p] for c, p in zip(centre[-len(patch):], patch)]
    slice_index = None
    if len(patch) == 2:  # 2d configuration: one slice of the 3D case
        slice_index = int(centre[0])
        data, seg = data[:, slice_index], seg[:, slice_index]
    image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0).astype(np.float32))
    labels = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1).astype(np.int16))
    new_image, new_labels = transform.insert(image, labels, rng)
    if new_image is None:
        return None
    lesion = (new_labels[0] == plan.tumour_label).numpy() & (labels[0] != plan.tumour_label).numpy()
    return SyntheticPatch(bbox, slice_index, image, labels, new_image, new_labels, lesion)


def write_previews(dataset: str | int, configuration: str = "3d_fullres", num: int = 8,
                   output_dir: str | Path = "synth_preview", plans_identifier: str = "nnUNetPlans",
                   seed: int = 0) -> list[Path]:
    """Draws ``num`` patches of the configuration's patch size around organ voxels of preprocessed training
    cases, inserts one synthetic tumour in each with the dataset's synth plan, and writes PNGs.

    Returns:
        Paths of the written PNGs.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plan = load_synth_plan(dataset, configuration, plans_identifier)
    base = preprocessed_dir(dataset)
    conf = PlansManager(load_json(base / f"{plans_identifier}.json")).get_configuration(configuration)
    folder = base / conf.data_identifier
    ds = infer_dataset_class(str(folder))(str(folder))
    patch = tuple(conf.patch_size)
    templates = None
    if plan.shapes.deformation == "template":  # real tumour masks of fold 0's training cases, as its trainer uses
        from nnunet_synth.generators.splits import split_cases
        from nnunet_synth.generators.templates import fold_templates

        templates, _ = fold_templates(base, conf, plan, split_cases(dataset, configuration, 0, plans_identifier)[0])
    transform = SynthTumourTransform(plan, 1.0, patch, seed, templates=templates)
    rng = np.random.default_rng(seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    identifiers = sorted(ds.identifiers)
    for i in tqdm(range(num), desc="synth previews", unit="png"):
        for _ in range(20):  # a random organ voxel of a random case as patch centre; retry where nothing fits
            case = identifiers[rng.integers(len(identifiers))]
            data, seg, _, _ = ds.load_case(case)
            drawn = draw_synthetic_patch(np.asarray(data), np.asarray(seg), plan, transform, patch, rng)
            if drawn is not None:
                break
        else:
            where = (f"organ label {plan.organ_label}" if plan.organ_label is not None
                     else f"tissue region {plan.tissue}")
            raise RuntimeError(f"no synthetic tumour could be placed in 20 patches of {base.name}: is the {where} "
                               f"of nnUNetSynthPlans.json right? (nnUNetv2_synth_plan --organ-label N)")
        image, labels, new_image, lesion = drawn.image, drawn.labels, drawn.new_image, drawn.lesion
        path = out / f"preview_{i:02d}_{case}.png"
        render_preview(image.numpy(), (labels[0] == plan.tumour_label).numpy(), new_image.numpy(), lesion,
                       tuple(plan.spacing[-len(patch):]),
                       f"{base.name} {case} ({configuration}), {plan.backend}: synthetic tumour in red, "
                       f"real in blue", path)
        written.append(path)
    return written
